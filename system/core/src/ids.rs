//! Typed identifiers. Every id has a canonical text form (`Display`), parses it
//! back (`FromStr`), and round-trips through serde (postcard on disk and on the
//! simulated wire, JSON in histories).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A text form that did not parse as the id it was meant to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {reason}")]
pub struct ParseIdError {
    /// Which id type was being parsed (`"worker id"`, `"task id"`, ...).
    pub kind: &'static str,
    /// The offending input, as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn parse_err(kind: &'static str, input: &str, reason: &'static str) -> ParseIdError {
    ParseIdError { kind, input: input.to_owned(), reason }
}

/// The longest worker id accepted. It ends up in certificate names and file paths.
pub const WORKER_ID_LEN_MAX: usize = 64;

/// A worker's stable name: the subject of its client certificate.
///
/// 1 to [`WORKER_ID_LEN_MAX`] ASCII characters from `[A-Za-z0-9._-]`, starting with a
/// letter or digit, so that it is safe in a certificate name, a file name and a log line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(String);

impl WorkerId {
    /// Validates and wraps a worker name.
    pub fn new(name: impl Into<String>) -> Result<Self, ParseIdError> {
        let name = name.into();
        let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if name.is_empty() {
            return Err(parse_err("worker id", &name, "must not be empty"));
        }
        if name.len() > WORKER_ID_LEN_MAX {
            return Err(parse_err("worker id", &name, "longer than 64 characters"));
        }
        if !first_ok {
            return Err(parse_err("worker id", &name, "must start with a letter or digit"));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(parse_err("worker id", &name, "only letters, digits, '.', '_' and '-' are allowed"));
        }
        Ok(WorkerId(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for WorkerId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorkerId::new(s)
    }
}

impl Serialize for WorkerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WorkerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WorkerId::new(s).map_err(serde::de::Error::custom)
    }
}

/// Defines a `u64`/`u32` newtype whose text form is the bare number, optionally prefixed.
macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident($int:ty), $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl $name {
            /// The raw number.
            pub const fn get(self) -> $int {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let digits = s
                    .strip_prefix($prefix)
                    .ok_or_else(|| parse_err($kind, s, concat!("must start with \"", $prefix, "\"")))?;
                parse_decimal::<$int>(digits).map($name).ok_or_else(|| parse_err($kind, s, "not a decimal number in range"))
            }
        }
    };
}

/// Parses canonical decimal only: no sign, no leading zeros (so text forms are unique).
fn parse_decimal<T: FromStr>(digits: &str) -> Option<T> {
    let canonical =
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    if canonical { digits.parse().ok() } else { None }
}

numeric_id!(
    /// Which registration of a worker this is. The coordinator hands out a new,
    /// strictly larger incarnation on every Register; messages from an older one are stale.
    Incarnation(u64), "incarnation", "inc-"
);
numeric_id!(
    /// A job: a batch of tasks submitted together. Assigned by the coordinator from a
    /// persisted counter, so ids are never reused, even across restarts.
    JobId(u64), "job id", "job-"
);
numeric_id!(
    /// How many times a task has been leased; the first lease is attempt 1.
    Attempt(u32), "attempt", ""
);
numeric_id!(
    /// A lease's fencing token: drawn from one coordinator-wide, persisted, strictly
    /// increasing counter. A result is accepted only with the task's current token.
    FencingToken(u64), "fencing token", ""
);

impl FencingToken {
    /// The token after this one.
    pub fn next(self) -> FencingToken {
        FencingToken(self.0.checked_add(1).expect("fencing token counter overflowed u64"))
    }
}

impl Incarnation {
    /// The incarnation after this one.
    pub fn next(self) -> Incarnation {
        Incarnation(self.0.checked_add(1).expect("incarnation counter overflowed u64"))
    }
}

/// One task of a job: the job and the task's index within it. Text form `job-42.7`
/// (also in JSON); a `(job, index)` pair in binary encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId {
    /// The job the task belongs to.
    pub job: JobId,
    /// The task's position in the job, from 0.
    pub index: u32,
}

impl TaskId {
    /// The `index`th task of `job`.
    pub const fn new(job: JobId, index: u32) -> Self {
        TaskId { job, index }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.job, self.index)
    }
}

impl FromStr for TaskId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (job, index) =
            s.rsplit_once('.').ok_or_else(|| parse_err("task id", s, "expected JOB.INDEX, e.g. job-42.7"))?;
        let job = job.parse::<JobId>().map_err(|_| parse_err("task id", s, "the part before '.' is not a job id"))?;
        let index = parse_decimal::<u32>(index)
            .ok_or_else(|| parse_err("task id", s, "the part after '.' is not a task index"))?;
        Ok(TaskId { job, index })
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.collect_str(self) } else { (self.job, self.index).serialize(s) }
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <(JobId, u32)>::deserialize(d).map(|(job, index)| TaskId { job, index })
        }
    }
}

/// The SHA-256 of some bytes: the address of a result in the object store.
/// Text form: 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId([u8; 32]);

impl ContentId {
    /// The content id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ContentId(Sha256::digest(bytes).into())
    }

    /// Wraps a digest computed elsewhere (e.g. by a streaming [`ContentHasher`]).
    pub const fn from_digest(digest: [u8; 32]) -> Self {
        ContentId(digest)
    }

    /// The raw digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        // A table lookup per nibble: `hex::encode` builds the string a char at a time,
        // and every history line and audit entry of a commit carries a content id.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Vec::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)]);
            out.push(DIGITS[usize::from(b & 0x0f)]);
        }
        String::from_utf8(out).expect("hex digits are ASCII")
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.to_hex())
    }
}

impl FromStr for ContentId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(parse_err("content id", s, "expected 64 lowercase hex digits (a SHA-256)"));
        }
        let mut digest = [0u8; 32];
        hex::decode_to_slice(s, &mut digest).map_err(|_| parse_err("content id", s, "not hex"))?;
        Ok(ContentId(digest))
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.to_hex()) } else { self.0.serialize(s) }
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(ContentId)
        }
    }
}

/// Computes a [`ContentId`] over bytes that arrive in pieces (a streamed upload).
#[derive(Debug, Default, Clone)]
pub struct ContentHasher(Sha256);

impl ContentHasher {
    /// A hasher that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next piece.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The id of everything fed so far.
    pub fn finish(self) -> ContentId {
        ContentId(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip<T>(value: &T)
    where
        T: fmt::Display + FromStr<Err = ParseIdError> + Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug,
    {
        let text = value.to_string();
        assert_eq!(&text.parse::<T>().expect("own text form parses"), value, "text {text}");
        let bytes = postcard::to_allocvec(value).expect("postcard encodes");
        assert_eq!(&postcard::from_bytes::<T>(&bytes).expect("postcard decodes"), value);
        let json = serde_json::to_string(value).expect("json encodes");
        assert_eq!(&serde_json::from_str::<T>(&json).expect("json decodes"), value);
    }

    fn worker_id() -> impl Strategy<Value = WorkerId> {
        "[A-Za-z0-9][A-Za-z0-9._-]{0,63}".prop_map(|s| WorkerId::new(s).expect("strategy yields valid ids"))
    }

    proptest! {
        #[test]
        fn worker_id_round_trips(id in worker_id()) { round_trip(&id); }

        #[test]
        fn numeric_ids_round_trip(n in any::<u64>(), a in any::<u32>()) {
            round_trip(&Incarnation(n));
            round_trip(&JobId(n));
            round_trip(&Attempt(a));
            round_trip(&FencingToken(n));
        }

        #[test]
        fn task_id_round_trips(job in any::<u64>(), index in any::<u32>()) {
            round_trip(&TaskId::new(JobId(job), index));
        }

        #[test]
        fn content_id_round_trips(digest in any::<[u8; 32]>()) {
            round_trip(&ContentId::from_digest(digest));
            prop_assert_eq!(ContentId::from_digest(digest).to_hex(), hex::encode(digest));
        }

        #[test]
        fn streamed_hash_equals_one_shot(bytes in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..512) {
            let cut = cut.min(bytes.len());
            let mut hasher = ContentHasher::new();
            hasher.update(&bytes[..cut]);
            hasher.update(&bytes[cut..]);
            prop_assert_eq!(hasher.finish(), ContentId::of(&bytes));
        }

        #[test]
        fn worker_id_rejects_bad_characters(prefix in "[a-z]{1,8}", bad in "[ /:@\\\\*\u{e9}]") {
            let name = format!("{prefix}{bad}");
            prop_assert!(WorkerId::new(name).is_err());
        }
    }

    #[test]
    fn text_forms_are_readable() {
        let task = TaskId::new(JobId(42), 7);
        assert_eq!(task.to_string(), "job-42.7");
        assert_eq!(Incarnation(3).to_string(), "inc-3");
        assert_eq!(ContentId::of(b"").to_string(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn non_canonical_text_is_rejected() {
        assert!("job-007".parse::<JobId>().is_err(), "leading zeros would give two texts for one id");
        assert!("job-".parse::<JobId>().is_err());
        assert!("42".parse::<JobId>().is_err());
        assert!("job-1.+2".parse::<TaskId>().is_err());
        assert!("job-18446744073709551616".parse::<JobId>().is_err(), "u64 overflow");
        assert!("E3B0".parse::<ContentId>().is_err());
        assert!("".parse::<WorkerId>().is_err());
        assert!("-w1".parse::<WorkerId>().is_err());
        assert!("a".repeat(65).parse::<WorkerId>().is_err());
    }

    #[test]
    fn parse_errors_name_the_kind_and_input() {
        let err = "nope".parse::<TaskId>().expect_err("not a task id");
        let text = err.to_string();
        assert!(text.contains("task id") && text.contains("nope"), "{text}");
    }

    #[test]
    fn json_rejects_invalid_worker_id() {
        assert!(serde_json::from_str::<WorkerId>("\"has space\"").is_err());
    }
}

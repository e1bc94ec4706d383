//! Every committed fuzz corpus file, and every seed, through its target's body on the
//! stable toolchain: what a fuzzer once found stays fixed. (`make fuzz` runs the
//! targets themselves, on nightly, with cargo-fuzz.)

use std::path::PathBuf;

/// `fuzz/corpus/` of this checkout, found at run time (`ROLLOUT_FUZZ_CORPUS` overrides)
/// so a shared target dir cannot point it at another checkout.
fn corpus_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ROLLOUT_FUZZ_CORPUS") {
        return PathBuf::from(dir);
    }
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    manifest.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../../fuzz/corpus")
}

#[test]
fn every_seed_runs_through_its_target() {
    let seeds = rollout_fuzz::seeds();
    for (name, _) in rollout_fuzz::TARGETS {
        assert!(seeds.iter().any(|(n, _)| n == name), "target {name} has no seed");
    }
    for (name, bytes) in seeds {
        let body = rollout_fuzz::target(name).unwrap_or_else(|| panic!("seed for unknown target {name}"));
        body(&bytes);
    }
}

#[test]
fn every_committed_corpus_file_runs_through_its_target() {
    let dir = corpus_dir();
    let mut files = 0;
    for (name, body) in rollout_fuzz::TARGETS {
        let target_dir = dir.join(name);
        let entries = std::fs::read_dir(&target_dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a committed corpus)", target_dir.display()));
        let mut here = 0;
        for entry in entries {
            let path = entry.expect("readable entry").path();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            body(&bytes);
            here += 1;
        }
        assert!(here > 0, "{}: an empty corpus", target_dir.display());
        files += here;
    }
    assert!(files >= rollout_fuzz::TARGETS.len());
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<n>` (run by `make fuzz-seeds`).
#[test]
#[ignore = "writes files: run by `make fuzz-seeds`"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    let mut counts = std::collections::BTreeMap::new();
    for (name, bytes) in rollout_fuzz::seeds() {
        let n = counts.entry(name).or_insert(0);
        *n += 1;
        let target_dir = dir.join(name);
        std::fs::create_dir_all(&target_dir).expect("corpus dir");
        std::fs::write(target_dir.join(format!("seed-{n}")), bytes).expect("seed written");
    }
}

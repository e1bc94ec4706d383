//! [`LocalComputeHint`]: what this Linux host offers, from `/proc/cpuinfo`,
//! `/proc/meminfo` and (feature `nvml`) NVML; and whether it is about to be
//! preempted, from a marker file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollout_core::traits::{ComputeHint, Gpu, Inventory, PreemptionNotice};
use rollout_core::{Error, Fatal, Result};

use crate::io_error::io_error;

/// Where Linux describes the CPUs.
const PROC_CPUINFO: &str = "/proc/cpuinfo";
/// Where Linux describes memory.
const PROC_MEMINFO: &str = "/proc/meminfo";

/// A [`ComputeHint`] for the local Linux host.
///
/// - CPUs: the number of `processor` lines in the cpuinfo file (logical CPUs, the
///   whole host: not limited by cgroups or affinity).
/// - Memory: `MemTotal` of the meminfo file.
/// - GPUs: with feature `nvml`, every device NVML lists (index, name, UUID, total
///   memory). Without the feature, or when NVML or the driver is missing, the list is
///   empty; never an error, since a CPU-only host is a normal host.
/// - Preemption: when a marker path is configured
///   ([`LocalComputeHint::with_preemption_marker`]) and a file exists there, a notice
///   whose `source` is the path. If the file holds a whole number of seconds (e.g.
///   written by a spot-termination watcher: `echo 120 > /run/rollout/preempt`), that is
///   `in_at_most`; otherwise the time left is unknown.
#[derive(Debug, Clone)]
pub struct LocalComputeHint {
    cpuinfo_path: PathBuf,
    meminfo_path: PathBuf,
    preemption_marker: Option<PathBuf>,
}

impl Default for LocalComputeHint {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalComputeHint {
    /// Reads the live `/proc/cpuinfo` and `/proc/meminfo`; no preemption marker.
    pub fn new() -> Self {
        LocalComputeHint {
            cpuinfo_path: PathBuf::from(PROC_CPUINFO),
            meminfo_path: PathBuf::from(PROC_MEMINFO),
            preemption_marker: None,
        }
    }

    /// Reads CPUs and memory from these files instead of `/proc` (fixtures, or a
    /// host's `/proc` mounted elsewhere).
    pub fn with_proc_files(mut self, cpuinfo_path: impl Into<PathBuf>, meminfo_path: impl Into<PathBuf>) -> Self {
        self.cpuinfo_path = cpuinfo_path.into();
        self.meminfo_path = meminfo_path.into();
        self
    }

    /// Reports a preemption while a file exists at `marker_path` (see the type docs).
    pub fn with_preemption_marker(mut self, marker_path: impl Into<PathBuf>) -> Self {
        self.preemption_marker = Some(marker_path.into());
        self
    }

    /// The number of logical CPUs, from the cpuinfo file.
    pub fn cpus(&self) -> Result<u32> {
        parse_cpuinfo(&read(&self.cpuinfo_path)?, &self.cpuinfo_path)
    }

    /// Total memory, from the meminfo file.
    pub fn memory_bytes(&self) -> Result<u64> {
        parse_meminfo(&read(&self.meminfo_path)?, &self.meminfo_path)
    }

    /// The GPUs NVML reports; empty without feature `nvml` or without a driver.
    pub fn gpus(&self) -> Vec<Gpu> {
        nvml_gpus()
    }
}

impl ComputeHint for LocalComputeHint {
    fn inventory(&self) -> Result<Inventory> {
        Ok(Inventory { cpus: self.cpus()?, memory_bytes: self.memory_bytes()?, gpus: self.gpus() })
    }

    fn preemption_signal(&self) -> Option<PreemptionNotice> {
        let marker = self.preemption_marker.as_ref()?;
        // Can't report an error here: an unreadable marker that exists still announces
        // a preemption, just without a deadline.
        if !marker.try_exists().unwrap_or(false) {
            return None;
        }
        let in_at_most =
            fs::read_to_string(marker).ok().and_then(|text| text.trim().parse::<u64>().ok()).map(Duration::from_secs);
        Some(PreemptionNotice { in_at_most, source: marker.display().to_string() })
    }
}

/// Counts the logical CPUs in the text of a Linux `/proc/cpuinfo` (its `processor`
/// lines). `path` is only for error messages. No `processor` line, or one whose value
/// is not a number, is [`Fatal::Corrupt`] naming `path`.
pub fn parse_cpuinfo(text: &str, path: &Path) -> Result<u32> {
    let mut cpus: u32 = 0;
    for (line_index, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else { continue };
        if key.trim() != "processor" {
            continue;
        }
        if value.trim().parse::<u32>().is_err() {
            return Err(corrupt(
                path,
                format!("line {}: processor number {:?} is not a number", line_index + 1, value.trim()),
            ));
        }
        cpus = cpus.checked_add(1).ok_or_else(|| corrupt(path, "more than 2^32 processor lines".to_owned()))?;
    }
    if cpus == 0 {
        return Err(corrupt(path, "no \"processor : N\" lines; is this a Linux /proc/cpuinfo?".to_owned()));
    }
    Ok(cpus)
}

/// Total memory in bytes from the text of a Linux `/proc/meminfo` (its
/// `MemTotal: N kB` line). `path` is only for error messages. A missing or malformed
/// `MemTotal` line is [`Fatal::Corrupt`] naming `path`.
pub fn parse_meminfo(text: &str, path: &Path) -> Result<u64> {
    let (line_index, value) = text
        .lines()
        .enumerate()
        .find_map(|(i, line)| line.strip_prefix("MemTotal:").map(|rest| (i, rest.trim())))
        .ok_or_else(|| corrupt(path, "no \"MemTotal: N kB\" line; is this a Linux /proc/meminfo?".to_owned()))?;
    let malformed = || corrupt(path, format!("line {}: MemTotal {value:?} is not \"N kB\"", line_index + 1));
    let (number, unit) = value.split_once(char::is_whitespace).ok_or_else(malformed)?;
    // The kernel writes "kB" and means KiB.
    if unit.trim() != "kB" {
        return Err(malformed());
    }
    let kib = number.parse::<u64>().map_err(|_| malformed())?;
    if kib == 0 {
        return Err(corrupt(path, format!("line {}: MemTotal is 0", line_index + 1)));
    }
    kib.checked_mul(1024).ok_or_else(|| corrupt(path, format!("line {}: MemTotal {kib} kB overflows", line_index + 1)))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| io_error(format_args!("reading {}", path.display()), &e))
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::Fatal(Fatal::Corrupt { path: path.to_path_buf(), reason })
}

#[cfg(feature = "nvml")]
fn nvml_gpus() -> Vec<Gpu> {
    use nvml_wrapper::Nvml;

    // No library or no driver: a host without GPUs, as far as rollout is concerned.
    let Ok(nvml) = Nvml::init() else { return Vec::new() };
    let Ok(count) = nvml.device_count() else { return Vec::new() };
    (0..count)
        .filter_map(|index| {
            // A device that cannot describe itself is left out rather than reported
            // half-known; the others are still usable.
            let device = nvml.device_by_index(index).ok()?;
            Some(Gpu {
                index,
                name: device.name().ok()?,
                uuid: device.uuid().ok()?,
                memory_bytes: device.memory_info().ok()?.total,
            })
        })
        .collect()
}

#[cfg(not(feature = "nvml"))]
fn nvml_gpus() -> Vec<Gpu> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/fixture")
    }

    #[test]
    fn cpuinfo_counts_processor_lines_and_names_the_file_when_malformed() {
        assert_eq!(parse_cpuinfo("processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\n", path()).ok(), Some(2));
        let err = parse_cpuinfo("model name : x\n", path()).expect_err("no processors");
        assert!(err.to_string().starts_with("/fixture: no \"processor"), "{err}");
        let err = parse_cpuinfo("processor : zero\n", path()).expect_err("not a number");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn meminfo_reads_memtotal_in_kib() {
        assert_eq!(parse_meminfo("MemTotal:       16 kB\nMemFree: 1 kB\n", path()).ok(), Some(16 * 1024));
        for bad in ["MemFree: 1 kB\n", "MemTotal: 16\n", "MemTotal: 16 MB\n", "MemTotal: x kB\n", "MemTotal: 0 kB\n"] {
            let err = parse_meminfo(bad, path()).expect_err(bad);
            assert!(err.to_string().starts_with("/fixture: "), "{bad}: {err}");
        }
        let err = parse_meminfo(&format!("MemTotal: {} kB\n", u64::MAX), path()).expect_err("overflow");
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}

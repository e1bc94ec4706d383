//! LocalComputeHint: CPUs and memory from fixture files and from the live /proc, GPU
//! discovery without NVML, the preemption marker; and the live NVML check for GPU hosts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rollout_cloud_local::LocalComputeHint;
use rollout_core::traits::{ComputeHint, PreemptionNotice};
use rollout_core::{Error, Fatal};

fn fixture(name: &str) -> PathBuf {
    // Read at run time: a binary reused from a shared target dir may have been built in
    // another checkout, whose path `env!` would have baked in.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
    Path::new(&manifest_dir).join("tests/fixtures").join(name)
}

fn hint(cpuinfo: &str, meminfo: &str) -> LocalComputeHint {
    LocalComputeHint::new().with_proc_files(fixture(cpuinfo), fixture(meminfo))
}

#[test]
fn fixture_files_give_cpus_and_memory() {
    let inventory = hint("cpuinfo_x86_4cpu", "meminfo_64gib").inventory().expect("inventory");
    assert_eq!(inventory.cpus, 4);
    assert_eq!(inventory.memory_bytes, 64 * 1024 * 1024 * 1024);

    assert_eq!(hint("cpuinfo_aarch64_2cpu", "meminfo_64gib").cpus().expect("cpus"), 2);
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    for (hint, bad) in [
        (hint("cpuinfo_malformed", "meminfo_64gib"), "cpuinfo_malformed"),
        (hint("cpuinfo_x86_4cpu", "meminfo_malformed"), "meminfo_malformed"),
    ] {
        match hint.inventory() {
            Err(Error::Fatal(Fatal::Corrupt { path, .. })) => assert_eq!(path, fixture(bad)),
            other => panic!("expected Corrupt naming {bad}, got {other:?}"),
        }
    }

    let missing = hint("no_such_cpuinfo", "meminfo_64gib").inventory().expect_err("missing file");
    assert!(missing.to_string().contains("no_such_cpuinfo"), "{missing}");
}

#[cfg(target_os = "linux")]
#[test]
fn the_live_proc_parses() {
    let inventory = LocalComputeHint::new().inventory().expect("live /proc");
    assert!(inventory.cpus >= 1);
    assert!(inventory.memory_bytes >= 64 * 1024 * 1024, "{inventory:?}");
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(inventory.cpus as usize >= available, "cpuinfo counts the whole host: {inventory:?}");
}

#[cfg(not(feature = "nvml"))]
#[test]
fn without_nvml_there_are_no_gpus() {
    assert!(LocalComputeHint::new().gpus().is_empty());
    assert!(hint("cpuinfo_x86_4cpu", "meminfo_64gib").inventory().expect("inventory").gpus.is_empty());
}

/// With the feature on, a host without a driver must still answer (empty list), and a
/// host with one must list sane GPUs; either way, never an error.
#[cfg(feature = "nvml")]
#[test]
fn with_nvml_discovery_never_fails() {
    for gpu in LocalComputeHint::new().gpus() {
        assert!(!gpu.name.is_empty() && !gpu.uuid.is_empty() && gpu.memory_bytes > 0, "{gpu:?}");
    }
}

#[cfg(feature = "nvml")]
#[test]
#[ignore = "needs an NVIDIA GPU and driver; run with --features nvml -- --ignored on a GPU host"]
fn nvml_lists_the_gpus_of_a_gpu_host() {
    let gpus = LocalComputeHint::new().gpus();
    assert!(!gpus.is_empty(), "no GPU found through NVML");
    for (position, gpu) in gpus.iter().enumerate() {
        assert!(!gpu.name.is_empty() && !gpu.uuid.is_empty() && gpu.memory_bytes > 0, "{gpu:?}");
        assert_eq!(gpu.index as usize, position, "{gpus:?}");
    }
}

#[test]
fn a_preemption_marker_file_announces_preemption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("preempt");

    assert_eq!(LocalComputeHint::new().preemption_signal(), None, "no marker configured");
    let hint = LocalComputeHint::new().with_preemption_marker(&marker);
    assert_eq!(hint.preemption_signal(), None, "no file yet");

    std::fs::write(&marker, "").expect("touch marker");
    let source = marker.display().to_string();
    assert_eq!(hint.preemption_signal(), Some(PreemptionNotice { in_at_most: None, source: source.clone() }));

    std::fs::write(&marker, "120\n").expect("write seconds");
    assert_eq!(hint.preemption_signal(), Some(PreemptionNotice { in_at_most: Some(Duration::from_secs(120)), source }));
}

//! Writes arbitrary bytes as a partition's only segment, recovers it the way a restart would,
//! and reads every record back (`sluice_log::check_recovery`): recovery must never panic, must
//! keep a prefix of whole valid frames, and what it keeps must read back as offsets 0..n. Run
//! with `cargo +nightly fuzz run segment_recovery` from `gateway/log/`; `corpus/segment_recovery/`
//! holds the seeds (replayed by a unit test in CI).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("sluice-fuzz-recovery-{}", std::process::id()));
    if let Err(broken) = sluice_log::check_recovery(&dir, data) {
        panic!("{broken}");
    }
});

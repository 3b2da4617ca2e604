//! Feeds arbitrary text to the configuration loader (TOML parse, model, validation, topic rules,
//! the producer transports): it must never panic, and a configuration it accepts must validate
//! again to no problems. Run with `cargo +nightly fuzz run config_loader` from `config/`;
//! `corpus/config_loader/` holds the seeds (replayed by a unit test in CI).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sluice_config::fuzz_check(text);
    }
});

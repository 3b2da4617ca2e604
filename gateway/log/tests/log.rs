//! Invariants of the embedded log: framing on disk, offsets, indexes, recovery, retention, group
//! commit. Everything runs against real files in a temporary directory.

use std::fs::{self, OpenOptions};
use std::path::Path;

use proptest::prelude::*;
use sluice_log::{
    Frame, FrameBuilder, Log, LogError, LogMetrics, LogOptions, PartitionOptions, PartitionReader,
    PartitionWriter, StreamOptions,
};

fn frame(ts: i64, values: &[Vec<u8>]) -> Frame {
    let mut b = FrameBuilder::new(ts, b"application/octet-stream", b"test", b"tester", 0);
    for (i, v) in values.iter().enumerate() {
        let key = format!("k{i}");
        b.push(
            Some(key.as_bytes()),
            None,
            [(&b"h"[..], &b"v"[..])].into_iter(),
            v,
        );
    }
    b.finish()
}

/// Appends one frame per entry of `batches`, one group each; returns every value in offset order.
fn write_batches(w: &mut PartitionWriter, batches: &[Vec<Vec<u8>>], ts0: i64) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let mut f = frame(ts0 + i as i64, b);
        let before = w.next_offset();
        let bases = w.append(&mut [&mut f], true, ts0 + i as i64).unwrap();
        assert_eq!(bases, vec![before]);
        assert_eq!(w.next_offset(), before + b.len() as u64);
        all.extend(b.iter().cloned());
    }
    all
}

fn read_all(dir: &Path, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut r = PartitionReader::from_offset(dir, from).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push((rec.offset, rec.value));
    }
    out
}

fn opts(segment_bytes: u64, interval: u64) -> PartitionOptions {
    PartitionOptions {
        segment_bytes,
        segment_ms: 0,
        index_interval_bytes: interval,
        retention_ms: 0,
        retention_bytes: 0,
        fault_fsync_fail_after: 0,
    }
}

fn batches() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    proptest::collection::vec(
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
        1..25,
    )
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Offsets are contiguous across frames and segments, and every record reads back as written
    /// from any start offset (exercising the offset index across segment boundaries).
    #[test]
    fn offsets_are_contiguous_and_read_back_from_any_offset(
        b in batches(), seg in 512u64..4096, interval in 64u64..1024, start in any::<prop::sample::Index>()
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, _) = PartitionWriter::open(tmp.path(), opts(seg, interval)).unwrap();
        let values = write_batches(&mut w, &b, 1000);
        let got = read_all(tmp.path(), 0);
        prop_assert_eq!(got.len(), values.len());
        for (i, (off, v)) in got.iter().enumerate() {
            prop_assert_eq!(*off, i as u64);
            prop_assert_eq!(v, &values[i]);
        }
        let from = start.index(values.len()) as u64;
        let tail = read_all(tmp.path(), from);
        prop_assert_eq!(tail.first().map(|t| t.0), Some(from));
        prop_assert_eq!(tail.len() as u64, values.len() as u64 - from);
    }

    /// Cutting the active segment anywhere loses only the frame that was cut: recovery keeps every
    /// complete frame before the cut, and appends continue at the next offset.
    #[test]
    fn recovery_keeps_every_complete_frame_before_a_cut(b in batches(), cut in any::<prop::sample::Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, _) = PartitionWriter::open(tmp.path(), opts(1 << 30, 256)).unwrap();
        let mut ends = Vec::new(); // (byte end of frame, records through it)
        let mut pos = 0u64;
        let mut records = 0u64;
        for (i, batch) in b.iter().enumerate() {
            let mut f = frame(i as i64, batch);
            pos += f.len() as u64;
            records += batch.len() as u64;
            w.append(&mut [&mut f], false, 0).unwrap();
            ends.push((pos, records));
        }
        drop(w);
        let log = log_files(tmp.path()).remove(0);
        let cut_at = cut.index(pos as usize + 1) as u64;
        OpenOptions::new().write(true).open(&log).unwrap().set_len(cut_at).unwrap();
        let kept = ends.iter().rev().find(|(end, _)| *end <= cut_at).map_or(0, |e| e.1);
        let kept_bytes = ends.iter().rev().find(|(end, _)| *end <= cut_at).map_or(0, |e| e.0);

        let (mut w, rec) = PartitionWriter::open(tmp.path(), opts(1 << 30, 256)).unwrap();
        prop_assert_eq!(w.next_offset(), kept);
        prop_assert_eq!(rec.truncated_bytes, cut_at - kept_bytes);
        prop_assert_eq!(fs::metadata(&log).unwrap().len(), kept_bytes);
        let got = read_all(tmp.path(), 0);
        prop_assert_eq!(got.len() as u64, kept);
        let mut f = frame(99, &[b"after".to_vec()]);
        prop_assert_eq!(w.append(&mut [&mut f], true, 0).unwrap(), vec![kept]);
        let got = read_all(tmp.path(), 0);
        prop_assert_eq!(got.last().unwrap(), &(kept, b"after".to_vec()));
    }
}

#[test]
fn a_corrupt_byte_truncates_from_the_damaged_frame_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartitionWriter::open(tmp.path(), opts(1 << 30, 64)).unwrap();
    let b: Vec<Vec<Vec<u8>>> = (0..10)
        .map(|i| vec![format!("value-{i}").into_bytes(); 3])
        .collect();
    let mut starts = Vec::new();
    let mut pos = 0;
    for (i, batch) in b.iter().enumerate() {
        let mut f = frame(i as i64, batch);
        starts.push(pos);
        pos += f.len() as u64;
        w.append(&mut [&mut f], true, 0).unwrap();
    }
    drop(w);
    // Flip one byte inside the value of frame 6.
    let log = log_files(tmp.path()).remove(0);
    let mut bytes = fs::read(&log).unwrap();
    let at = (starts[6] + 60) as usize;
    bytes[at] ^= 0x40;
    fs::write(&log, &bytes).unwrap();

    let (w, rec) = PartitionWriter::open(tmp.path(), opts(1 << 30, 64)).unwrap();
    assert_eq!(w.next_offset(), 18, "frames 0..6 hold 18 records");
    assert_eq!(rec.truncated_bytes, pos - starts[6]);
    assert!(
        rec.reason.as_deref().unwrap().contains("checksum"),
        "{rec:?}"
    );
    let got = read_all(tmp.path(), 0);
    assert_eq!(got.len(), 18);
    assert_eq!(got[17].1, b"value-5");
}

#[test]
fn zero_filled_tail_is_truncated() {
    // A power loss on some file systems leaves the file extended with zeros.
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartitionWriter::open(tmp.path(), PartitionOptions::default()).unwrap();
    let mut f = frame(1, &[b"x".to_vec()]);
    w.append(&mut [&mut f], true, 0).unwrap();
    drop(w);
    let log = log_files(tmp.path()).remove(0);
    let len = fs::metadata(&log).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let (w, rec) = PartitionWriter::open(tmp.path(), PartitionOptions::default()).unwrap();
    assert_eq!(w.next_offset(), 1);
    assert_eq!(rec.truncated_bytes, 4096);
}

#[test]
fn segments_roll_and_retention_deletes_oldest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(1024, 128);
    o.retention_bytes = 4096;
    let (mut w, _) = PartitionWriter::open(tmp.path(), o).unwrap();
    let b: Vec<Vec<Vec<u8>>> = (0..60).map(|_| vec![vec![7u8; 100]]).collect();
    write_batches(&mut w, &b, 0);
    let segments_before = w.segment_count();
    assert!(segments_before > 5, "{segments_before} segments");
    let deleted = w.apply_retention(0).unwrap();
    assert!(deleted > 0);
    assert_eq!(w.segment_count(), segments_before - deleted);
    assert!(w.size_bytes() <= 4096, "{} bytes kept", w.size_bytes());
    assert_eq!(log_files(tmp.path()).len(), w.segment_count());
    // Reading from 0 starts at the oldest offset still on disk.
    let got = read_all(tmp.path(), 0);
    assert_eq!(got[0].0, w.start_offset());
    assert_eq!(got.last().unwrap().0, 59);
    drop(w);
    // Restart is idempotent: same segments, same next offset.
    let (w, _) = PartitionWriter::open(tmp.path(), o).unwrap();
    assert_eq!(w.next_offset(), 60);
    assert_eq!(w.segment_count(), segments_before - deleted);
}

#[test]
fn a_spool_deletes_only_segments_wholly_below_the_released_offset() {
    let tmp = tempfile::tempdir().unwrap();
    // No retention settings: only what is released goes.
    let (mut w, _) = PartitionWriter::open(tmp.path(), opts(1024, 128)).unwrap();
    let b: Vec<Vec<Vec<u8>>> = (0..60).map(|_| vec![vec![7u8; 100]]).collect();
    write_batches(&mut w, &b, 0);
    let segments = w.segment_count();
    assert!(segments > 5, "{segments} segments");
    assert_eq!(w.apply_retention(i64::MAX).unwrap(), 0, "retention is off");
    assert_eq!(w.delete_below(0).unwrap(), 0);
    // Released up to offset 1: the first segment still holds offsets at or past it.
    assert_eq!(w.delete_below(1).unwrap(), 0);
    assert_eq!(w.start_offset(), 0);
    let released = 30;
    let deleted = w.delete_below(released).unwrap();
    assert!(deleted > 0 && deleted < segments, "{deleted} of {segments}");
    assert!(
        w.start_offset() <= released,
        "{} > {released}",
        w.start_offset()
    );
    let got = read_all(tmp.path(), 0);
    assert_eq!(got[0].0, w.start_offset());
    assert_eq!(got.last().unwrap().0, 59);
    // Everything released: every sealed segment goes, the active one stays.
    w.delete_below(60).unwrap();
    assert_eq!(w.segment_count(), 1);
    assert_eq!(w.next_offset(), 60);
}

#[test]
fn retention_by_age_keeps_the_active_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(1024, 128);
    o.retention_ms = 1000;
    let (mut w, _) = PartitionWriter::open(tmp.path(), o).unwrap();
    let b: Vec<Vec<Vec<u8>>> = (0..30).map(|_| vec![vec![1u8; 100]]).collect();
    write_batches(&mut w, &b, 10_000); // frame timestamps 10_000..10_030
    assert_eq!(w.apply_retention(10_500).unwrap(), 0, "nothing is old yet");
    let deleted = w.apply_retention(1_000_000).unwrap();
    assert!(deleted > 0);
    assert_eq!(w.segment_count(), 1);
    assert_eq!(w.next_offset(), 30);
}

#[test]
fn segments_roll_by_age() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(1 << 30, 64);
    o.segment_ms = 1000;
    let (mut w, _) = PartitionWriter::open(tmp.path(), o).unwrap();
    let mut f = frame(5_000, &[b"a".to_vec()]);
    w.append(&mut [&mut f], true, 5_000).unwrap();
    let mut f = frame(5_500, &[b"b".to_vec()]);
    w.append(&mut [&mut f], true, 5_500).unwrap();
    assert_eq!(w.segment_count(), 1, "younger than segment_ms");
    let mut f = frame(6_000, &[b"c".to_vec()]);
    w.append(&mut [&mut f], true, 6_000).unwrap();
    assert_eq!(w.segment_count(), 2, "the first frame is now 1000 ms old");
    assert_eq!(log_files(tmp.path()).len(), 2);
    assert_eq!(read_all(tmp.path(), 0).len(), 3);
}

#[test]
fn missing_sealed_index_is_rebuilt_and_orphans_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(1024, 64);
    let (mut w, _) = PartitionWriter::open(tmp.path(), o).unwrap();
    let b: Vec<Vec<Vec<u8>>> = (0..40).map(|i| vec![vec![i as u8; 90]]).collect();
    let values = write_batches(&mut w, &b, 0);
    drop(w);
    let first = log_files(tmp.path()).remove(0);
    fs::remove_file(first.with_extension("index")).unwrap();
    fs::write(tmp.path().join("00000000000099999999.index"), b"orphan").unwrap();
    let (w, rec) = PartitionWriter::open(tmp.path(), o).unwrap();
    assert_eq!(rec.rebuilt_indexes, 1);
    assert!(!tmp.path().join("00000000000099999999.index").exists());
    assert_eq!(w.next_offset(), 40);
    for from in [0u64, 3, 17, 39] {
        let got = read_all(tmp.path(), from);
        assert_eq!(got[0], (from, values[from as usize].clone()));
    }
}

#[test]
fn time_lookup_finds_the_first_frame_at_or_after_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartitionWriter::open(tmp.path(), opts(2048, 64)).unwrap();
    for i in 0..50i64 {
        let mut f = frame(1000 * i, &[format!("t{i}").into_bytes()]);
        w.append(&mut [&mut f], false, 0).unwrap();
    }
    w.sync().unwrap();
    assert!(w.segment_count() > 2);
    for (t, want) in [(0, 0u64), (2500, 3), (3000, 3), (48_001, 49)] {
        let mut r = PartitionReader::from_time(tmp.path(), t).unwrap();
        let rec = r.next_record().unwrap().unwrap();
        assert_eq!(rec.offset, want, "from time {t}");
        assert!(rec.timestamp_ms >= t);
    }
    let mut r = PartitionReader::from_time(tmp.path(), 1_000_000).unwrap();
    assert!(r.next_record().unwrap().is_none());
}

#[test]
fn a_reader_follows_appends_across_a_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut w, _) = PartitionWriter::open(tmp.path(), opts(600, 64)).unwrap();
    let mut r = PartitionReader::from_offset(tmp.path(), 0).unwrap();
    assert!(r.next_record().unwrap().is_none());
    for i in 0..20u64 {
        let mut f = frame(0, &[vec![i as u8; 100]]);
        w.append(&mut [&mut f], false, 0).unwrap();
        let rec = r.next_record().unwrap().expect("record just written");
        assert_eq!(rec.offset, i);
        assert!(r.next_record().unwrap().is_none());
    }
    assert!(w.segment_count() > 3);
}

fn log_opts(dir: &Path) -> LogOptions {
    LogOptions {
        data_dir: dir.to_path_buf(),
        ..LogOptions::default()
    }
}

const ONE: StreamOptions = StreamOptions {
    partitions: 1,
    retention_ms: 0,
    retention_bytes: 0,
};

#[tokio::test(flavor = "current_thread")]
async fn group_commit_covers_every_waiting_append_with_one_fsync() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = LogMetrics::default();
    let log = Log::open(log_opts(tmp.path()), metrics.clone(), |_| ONE)
        .await
        .unwrap();
    let s = log.get_or_create("g", ONE).await.unwrap();
    // On a current-thread runtime all 64 appends are queued before the writer task runs (64 is
    // below tokio's cooperative budget of 128 operations per poll).
    let appends = (0..64).map(|i| s.append(0, frame(0, &vec![vec![i as u8; 10]; 2]), true, None));
    let mut bases: Vec<u64> = futures_util::future::join_all(appends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    bases.sort_unstable();
    assert_eq!(bases, (0..64).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(metrics.fsyncs.get(), 1, "one fsync for the whole group");
    drop(s);
    log.close().await;
}

#[tokio::test]
async fn streams_persist_across_reopen_and_the_directory_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Log::open(log_opts(tmp.path()), LogMetrics::default(), |_| ONE)
        .await
        .unwrap();
    let three = StreamOptions {
        partitions: 3,
        ..ONE
    };
    let s = log.get_or_create("orders", three).await.unwrap();
    for p in 0..3 {
        assert_eq!(
            s.append(p, frame(0, &[b"a".to_vec()]), true, None)
                .await
                .unwrap(),
            0
        );
    }
    let second = Log::open(log_opts(tmp.path()), LogMetrics::default(), |_| ONE).await;
    assert!(matches!(second, Err(LogError::Locked(_))));
    drop(s);
    log.close().await;
    drop(log);

    // The stream keeps 3 partitions even though the settings now say 1, and offsets continue.
    let log = Log::open(log_opts(tmp.path()), LogMetrics::default(), |_| ONE)
        .await
        .unwrap();
    assert_eq!(log.stream_names(), vec!["orders".to_string()]);
    let s = log.stream("orders").unwrap();
    assert_eq!(s.partition_count(), 3);
    assert_eq!(
        s.append(2, frame(0, &[b"b".to_vec()]), true, None)
            .await
            .unwrap(),
        1
    );
    // A half-created stream (no stream.meta) is removed on open.
    drop(s);
    log.close().await;
    drop(log);
    fs::create_dir_all(tmp.path().join("streams/half/0")).unwrap();
    let log = Log::open(log_opts(tmp.path()), LogMetrics::default(), |_| ONE)
        .await
        .unwrap();
    assert!(log.stream("half").is_none());
    assert!(!tmp.path().join("streams/half").exists());
}

#[tokio::test]
async fn the_stream_limit_is_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let o = LogOptions {
        max_streams: 2,
        ..log_opts(tmp.path())
    };
    let log = Log::open(o, LogMetrics::default(), |_| ONE).await.unwrap();
    log.get_or_create("a", ONE).await.unwrap();
    log.get_or_create("b", ONE).await.unwrap();
    assert!(
        log.get_or_create("a", ONE).await.is_ok(),
        "existing streams still resolve"
    );
    assert!(matches!(
        log.get_or_create("c", ONE).await,
        Err(LogError::TooManyStreams(2))
    ));
}

//! The async face of the embedded log: streams, their partitions, and one group-commit task per
//! partition. Appends queue on a bounded channel; the task takes everything waiting (up to
//! `max_group_bytes`), writes it with one write, fsyncs once if any of it is durable, and answers
//! every waiter.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::frame::Frame;
use crate::metrics::LogMetrics;
use crate::partition::{PartitionOptions, PartitionWriter, sync_dir};
use crate::{LogError, partition_for_key};

/// Whatever must live until an append is written (e.g. an in-flight budget permit).
pub type Guard = Box<dyn Send + Sync + 'static>;

/// Settings of the whole log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub index_interval_bytes: u64,
    pub max_group_bytes: u64,
    /// How long non-durable writes may wait for an fsync.
    pub flush_interval: Duration,
    pub retention_check_interval: Duration,
    /// Test-only fault injection: every group commit waits this long first.
    pub fault_append_delay: Duration,
    /// Test-only fault injection: each partition's fsyncs fail from the Nth on (0 = never).
    pub fault_fsync_fail_after: u64,
    pub max_streams: usize,
    /// Appends that may queue per partition (bytes are bounded by the caller's budget).
    pub queue_depth: usize,
    /// A spool's log: segments are deleted only below what [`StreamLog::release`] allows, at
    /// each retention check, never by the retention settings.
    pub keep_until_released: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            segment_bytes: 128 << 20,
            segment_ms: 0,
            index_interval_bytes: 4096,
            max_group_bytes: 8 << 20,
            flush_interval: Duration::from_secs(1),
            retention_check_interval: Duration::from_secs(60),
            fault_append_delay: Duration::ZERO,
            fault_fsync_fail_after: 0,
            max_streams: 1000,
            queue_depth: 4096,
            keep_until_released: false,
        }
    }
}

/// Settings of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    pub partitions: u32,
    pub retention_ms: u64,
    pub retention_bytes: u64,
}

struct Op {
    frame: Frame,
    durable: bool,
    enqueued: Instant,
    reply: Option<oneshot::Sender<Result<u64, LogError>>>,
    /// The commit's answer for this op, sent once the partition's readable end has moved
    /// past it (so a producer's ack is never ahead of what readers see).
    outcome: Option<Result<u64, LogError>>,
    _guard: Option<Guard>,
}

struct Shared {
    opts: LogOptions,
    metrics: LogMetrics,
    healthy: AtomicBool,
}

/// The embedded log. Cheap to clone.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    streams: RwLock<HashMap<Arc<str>, Arc<StreamLog>>>,
    create: tokio::sync::Mutex<()>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    _lock: File,
}

/// One stream's partitions.
pub struct StreamLog {
    name: Arc<str>,
    partitions: Vec<mpsc::Sender<Op>>,
    /// Each partition's readable range, and its directory (readers open its files).
    marks: Vec<(watch::Receiver<Marks>, PathBuf)>,
    /// Per partition, the offset below which segments may be deleted (`keep_until_released`).
    released: Vec<Arc<AtomicU64>>,
    next_sticky: AtomicU32,
}

/// The readable range of a partition: `start` is its oldest offset still on disk (retention
/// moves it), `end` the offset after the last record that is durable (fsynced). Readers see
/// records below `end` only, so a consumer never reads an event a crash could take back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub start: u64,
    pub end: u64,
    /// Bytes of the partition's segments on disk.
    pub bytes: u64,
}

impl Marks {
    fn of(w: &PartitionWriter) -> Self {
        Marks {
            start: w.start_offset(),
            end: w.next_offset(),
            bytes: w.size_bytes(),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Log {
    /// Locks `opts.data_dir`, recovers every stream found there and starts their writers.
    /// `settings` gives the options of each existing stream by name.
    pub async fn open<F>(
        opts: LogOptions,
        metrics: LogMetrics,
        settings: F,
    ) -> Result<Log, LogError>
    where
        F: Fn(&str) -> StreamOptions + Send + 'static,
    {
        let shared = Arc::new(Shared {
            opts: opts.clone(),
            metrics,
            healthy: AtomicBool::new(true),
        });
        let (lock, found) = tokio::task::spawn_blocking({
            let shared = shared.clone();
            move || -> Result<_, LogError> {
                let dir = &shared.opts.data_dir;
                fs::create_dir_all(dir.join("streams"))?;
                let lock = File::create(dir.join("LOCK"))?;
                if lock.try_lock().is_err() {
                    return Err(LogError::Locked(dir.clone()));
                }
                let mut found = Vec::new();
                for entry in fs::read_dir(dir.join("streams"))? {
                    let entry = entry?;
                    let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    let path = entry.path();
                    if !path.join("stream.meta").exists() {
                        // Creation did not finish, so nothing in it was ever acked.
                        tracing::warn!(dir = %path.display(), "removing half-created stream");
                        fs::remove_dir_all(&path)?;
                        continue;
                    }
                    let partitions = read_meta(&path)?;
                    let mut o = settings(&name);
                    o.partitions = o.partitions.max(partitions);
                    let writers = open_stream_dirs(&shared, &path, o)?;
                    found.push((name, writers));
                }
                Ok((lock, found))
            }
        })
        .await
        .map_err(|e| LogError::Corrupt(format!("log open task failed: {e}")))??;
        let log = Log {
            inner: Arc::new(Inner {
                shared,
                streams: RwLock::new(HashMap::new()),
                create: tokio::sync::Mutex::new(()),
                writers: Mutex::new(Vec::new()),
                _lock: lock,
            }),
        };
        for (name, writers) in found {
            log.install(&name, writers);
        }
        Ok(log)
    }

    /// The stream, if it exists.
    pub fn stream(&self, name: &str) -> Option<Arc<StreamLog>> {
        self.inner.streams.read().unwrap().get(name).cloned()
    }

    /// Names of all streams.
    pub fn stream_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .streams
            .read()
            .unwrap()
            .keys()
            .map(|k| k.to_string())
            .collect();
        v.sort();
        v
    }

    /// False once any partition has stopped taking writes after an I/O error.
    pub fn healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::Relaxed)
    }

    /// The stream, created with `opts` if it does not exist yet. Creation is durable (its
    /// directories and metadata are fsynced) before this returns.
    pub async fn get_or_create(
        &self,
        name: &str,
        opts: StreamOptions,
    ) -> Result<Arc<StreamLog>, LogError> {
        if let Some(s) = self.stream(name) {
            return Ok(s);
        }
        let _one_at_a_time = self.inner.create.lock().await;
        if let Some(s) = self.stream(name) {
            return Ok(s);
        }
        let max = self.inner.shared.opts.max_streams;
        if self.inner.streams.read().unwrap().len() >= max {
            return Err(LogError::TooManyStreams(max));
        }
        let shared = self.inner.shared.clone();
        let stream_dir = shared.opts.data_dir.join("streams").join(name);
        let writers = tokio::task::spawn_blocking(move || -> Result<_, LogError> {
            fs::create_dir_all(&stream_dir)?;
            let writers = open_stream_dirs(&shared, &stream_dir, opts)?;
            write_meta(&stream_dir, opts.partitions)?;
            sync_dir(stream_dir.parent().expect("streams dir"))?;
            Ok(writers)
        })
        .await
        .map_err(|e| LogError::Corrupt(format!("stream creation task failed: {e}")))??;
        tracing::info!(
            stream = name,
            partitions = opts.partitions,
            "stream created"
        );
        Ok(self.install(name, writers))
    }

    fn install(&self, name: &str, writers: Vec<PartitionWriter>) -> Arc<StreamLog> {
        let shared = &self.inner.shared;
        let mut senders = Vec::with_capacity(writers.len());
        let mut marks = Vec::with_capacity(writers.len());
        let mut released = Vec::with_capacity(writers.len());
        let mut handles = self.inner.writers.lock().unwrap();
        let stream_dir = shared.opts.data_dir.join("streams").join(name);
        for (p, w) in writers.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(shared.opts.queue_depth);
            senders.push(tx);
            // What recovery left on disk is readable.
            let (marks_tx, marks_rx) = watch::channel(Marks::of(&w));
            marks.push((marks_rx, stream_dir.join(p.to_string())));
            let release = Arc::new(AtomicU64::new(0));
            released.push(release.clone());
            handles.push(tokio::spawn(run_writer(
                w,
                rx,
                shared.clone(),
                marks_tx,
                release,
            )));
        }
        let s = Arc::new(StreamLog {
            name: Arc::from(name),
            partitions: senders,
            marks,
            released,
            next_sticky: AtomicU32::new(0),
        });
        self.inner
            .streams
            .write()
            .unwrap()
            .insert(s.name.clone(), s.clone());
        s
    }

    /// Stops taking new appends, lets every queued append finish (written and fsynced), and waits
    /// for the writers to exit. A writer exits once every [`StreamLog`] handle of its stream is
    /// dropped, so callers drop theirs (finish their requests) before awaiting this.
    pub async fn close(&self) {
        self.inner.streams.write().unwrap().clear();
        let handles: Vec<_> = std::mem::take(&mut *self.inner.writers.lock().unwrap());
        for h in handles {
            let _ = h.await;
        }
    }
}

fn read_meta(stream_dir: &Path) -> Result<u32, LogError> {
    let text = fs::read_to_string(stream_dir.join("stream.meta"))?;
    text.trim()
        .strip_prefix("partitions=")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|&n| n >= 1)
        .ok_or_else(|| {
            LogError::Corrupt(format!(
                "{}: expected `partitions=N`, found {text:?}",
                stream_dir.join("stream.meta").display()
            ))
        })
}

fn write_meta(stream_dir: &Path, partitions: u32) -> Result<(), LogError> {
    let tmp = stream_dir.join("stream.meta.tmp");
    let mut f = File::create(&tmp)?;
    std::io::Write::write_all(&mut f, format!("partitions={partitions}\n").as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, stream_dir.join("stream.meta"))?;
    sync_dir(stream_dir)?;
    Ok(())
}

fn open_stream_dirs(
    shared: &Shared,
    stream_dir: &Path,
    o: StreamOptions,
) -> Result<Vec<PartitionWriter>, LogError> {
    let popts = PartitionOptions {
        segment_bytes: shared.opts.segment_bytes,
        segment_ms: shared.opts.segment_ms,
        index_interval_bytes: shared.opts.index_interval_bytes,
        retention_ms: o.retention_ms,
        retention_bytes: o.retention_bytes,
        fault_fsync_fail_after: shared.opts.fault_fsync_fail_after,
    };
    let mut writers = Vec::with_capacity(o.partitions as usize);
    for p in 0..o.partitions {
        let dir = stream_dir.join(p.to_string());
        let (w, rec) = PartitionWriter::open(&dir, popts)?;
        shared.metrics.truncated_bytes.inc_by(rec.truncated_bytes);
        writers.push(w);
    }
    sync_dir(stream_dir)?;
    if stream_dir.join("stream.meta").exists() && read_meta(stream_dir)? < o.partitions {
        write_meta(stream_dir, o.partitions)?;
    }
    Ok(writers)
}

impl StreamLog {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Partition `p`'s readable range, which changes as records become durable and retention
    /// deletes segments; `None` if there is no such partition.
    pub fn marks(&self, p: u32) -> Option<watch::Receiver<Marks>> {
        self.marks.get(p as usize).map(|(m, _)| m.clone())
    }

    /// Partition `p`'s directory, for a [`crate::PartitionReader`].
    pub fn partition_dir(&self, p: u32) -> Option<&Path> {
        self.marks.get(p as usize).map(|(_, d)| d.as_path())
    }

    /// Lets the segments of partition `p` whose records are all below `offset` be deleted at
    /// the next retention check (a log opened with `keep_until_released`).
    pub fn release(&self, p: u32, offset: u64) {
        if let Some(r) = self.released.get(p as usize) {
            r.fetch_max(offset, Ordering::Relaxed);
        }
    }

    /// The partition of a keyed event (Kafka's murmur2 partitioner).
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        partition_for_key(key, self.partition_count())
    }

    /// A partition for a request's keyless events: round robin, one partition per request.
    pub fn sticky_partition(&self) -> u32 {
        self.next_sticky.fetch_add(1, Ordering::Relaxed) % self.partition_count()
    }

    /// Appends `frame` to `partition` and returns its base offset once it is written, and
    /// fsynced when `durable`. `guard` is released when the write is done.
    pub async fn append(
        &self,
        partition: u32,
        frame: Frame,
        durable: bool,
        guard: Option<Guard>,
    ) -> Result<u64, LogError> {
        let (tx, rx) = oneshot::channel();
        self.send(partition, frame, durable, Some(tx), guard)
            .await?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Queues `frame` for `partition` (its place in the log is fixed when this returns); the
    /// receiver answers like [`StreamLog::append`] once it is written (and fsynced if durable).
    pub async fn append_queued(
        &self,
        partition: u32,
        frame: Frame,
        durable: bool,
    ) -> Result<oneshot::Receiver<Result<u64, LogError>>, LogError> {
        let (tx, rx) = oneshot::channel();
        self.send(partition, frame, durable, Some(tx), None).await?;
        Ok(rx)
    }

    /// Queues `frame` for `partition` without waiting for the write (for `ack = "received"`).
    /// `guard` is released when the write is done.
    pub async fn enqueue(
        &self,
        partition: u32,
        frame: Frame,
        guard: Option<Guard>,
    ) -> Result<(), LogError> {
        self.send(partition, frame, false, None, guard).await
    }

    async fn send(
        &self,
        partition: u32,
        frame: Frame,
        durable: bool,
        reply: Option<oneshot::Sender<Result<u64, LogError>>>,
        guard: Option<Guard>,
    ) -> Result<(), LogError> {
        let tx = self
            .partitions
            .get(partition as usize)
            .ok_or_else(|| LogError::Corrupt(format!("no partition {partition}")))?;
        tx.send(Op {
            frame,
            durable,
            enqueued: Instant::now(),
            reply,
            outcome: None,
            _guard: guard,
        })
        .await
        .map_err(|_| LogError::Closed)
    }
}

/// The group-commit loop of one partition.
async fn run_writer(
    mut writer: PartitionWriter,
    mut rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    marks: watch::Sender<Marks>,
    released: Arc<AtomicU64>,
) {
    // Readers see what is durable: the end moves after each fsync, the start after retention.
    let publish = |w: &PartitionWriter, synced: bool| {
        marks.send_if_modified(|m| {
            let now = Marks {
                start: w.start_offset(),
                end: if synced && w.poisoned().is_none() {
                    w.next_offset()
                } else {
                    m.end
                },
                bytes: w.size_bytes(),
            };
            std::mem::replace(m, now) != now
        });
    };
    let opts = &shared.opts;
    let mut dirty_since: Option<tokio::time::Instant> = None;
    let mut next_retention = tokio::time::Instant::now() + opts.retention_check_interval;
    let mut group: Vec<Op> = Vec::new();
    loop {
        let flush_at = dirty_since.map(|t| t + opts.flush_interval);
        tokio::select! {
            biased;
            op = rx.recv() => {
                let Some(op) = op else { break };
                let mut bytes = op.frame.len() as u64;
                group.push(op);
                while bytes < opts.max_group_bytes {
                    match rx.try_recv() {
                        Ok(op) => {
                            bytes += op.frame.len() as u64;
                            group.push(op);
                        }
                        Err(_) => break,
                    }
                }
                if !opts.fault_append_delay.is_zero() {
                    tokio::time::sleep(opts.fault_append_delay).await;
                }
                let ops = std::mem::take(&mut group);
                let durable = ops.iter().any(|o| o.durable);
                let (w, ops) = blocking(writer, ops, shared.clone(), |w, ops, s| commit(w, ops, s)).await;
                writer = w;
                group = ops;
                // Readers first, then the producers: an acked record is already readable.
                publish(&writer, durable);
                for op in group.drain(..) {
                    shared
                        .metrics
                        .append_seconds
                        .observe(op.enqueued.elapsed().as_secs_f64());
                    if let (Some(reply), Some(outcome)) = (op.reply, op.outcome) {
                        let _ = reply.send(outcome);
                    }
                }
                if durable {
                    dirty_since = None;
                } else if dirty_since.is_none() {
                    dirty_since = Some(tokio::time::Instant::now());
                }
            }
            _ = sleep_until_opt(flush_at), if flush_at.is_some() => {
                let (w, _) = blocking(writer, Vec::new(), shared.clone(), |w, _, s| {
                    let _ = sync_timed(w, s);
                }).await;
                writer = w;
                publish(&writer, true);
                dirty_since = None;
            }
            _ = tokio::time::sleep_until(next_retention) => {
                let below = released.load(Ordering::Relaxed);
                let (w, _) = blocking(writer, Vec::new(), shared.clone(), move |w, _, s| {
                    let deleted = if s.opts.keep_until_released {
                        w.delete_below(below)
                    } else {
                        w.apply_retention(now_ms())
                    };
                    match deleted {
                        Ok(n) => {
                            s.metrics.segments_deleted.inc_by(n as u64);
                        }
                        Err(e) => tracing::error!(error = %e, "retention failed"),
                    };
                }).await;
                writer = w;
                publish(&writer, false);
                next_retention = tokio::time::Instant::now() + opts.retention_check_interval;
            }
        }
    }
    if dirty_since.is_some() {
        let _ = blocking(writer, Vec::new(), shared.clone(), |w, _, s| {
            let _ = sync_timed(w, s);
        })
        .await;
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` on a blocking thread with the writer and the group, and hands both back.
async fn blocking<F>(
    writer: PartitionWriter,
    ops: Vec<Op>,
    shared: Arc<Shared>,
    f: F,
) -> (PartitionWriter, Vec<Op>)
where
    F: FnOnce(&mut PartitionWriter, &mut Vec<Op>, &Shared) + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let (mut w, mut ops) = (writer, ops);
        f(&mut w, &mut ops, &shared);
        (w, ops)
    })
    .await
    .expect("log writer thread panicked")
}

fn sync_timed(w: &mut PartitionWriter, s: &Shared) -> Result<(), LogError> {
    let t = Instant::now();
    let r = w.sync();
    s.metrics.fsyncs.inc();
    s.metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
    if r.is_err() {
        s.healthy.store(false, Ordering::Relaxed);
    }
    r
}

/// One group commit: write every frame, fsync once if any is durable, answer every waiter.
fn commit(w: &mut PartitionWriter, ops: &mut [Op], s: &Shared) {
    for op in ops.iter() {
        s.metrics
            .linger_seconds
            .observe(op.enqueued.elapsed().as_secs_f64());
    }
    let durable = ops.iter().any(|o| o.durable);
    let events: u64 = ops.iter().map(|o| u64::from(o.frame.count())).sum();
    let bytes: u64 = ops.iter().map(|o| o.frame.len() as u64).sum();
    let mut frames: Vec<&mut Frame> = ops.iter_mut().map(|o| &mut o.frame).collect();
    let mut result = w.append(&mut frames, false, now_ms());
    if result.is_ok()
        && durable
        && let Err(e) = sync_timed(w, s)
    {
        result = Err(e);
    }
    if w.poisoned().is_some() {
        s.healthy.store(false, Ordering::Relaxed);
    }
    match &result {
        Ok(_) => {
            s.metrics.group_events.observe(events as f64);
            s.metrics.group_bytes.observe(bytes as f64);
        }
        Err(e) => {
            s.metrics.append_errors.inc();
            tracing::error!(error = %e, "group commit failed");
        }
    }
    // Answered by the writer task once the readable end has moved (`run_writer`).
    for (i, op) in ops.iter_mut().enumerate() {
        op.outcome = Some(match &result {
            Ok(bases) => Ok(bases[i]),
            Err(e) => Err(e.clone()),
        });
    }
}

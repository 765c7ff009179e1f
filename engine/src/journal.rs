//! The journal: the only module that touches RocksDB.
//!
//! Layout, one column family each:
//! - `journal`: `sku id | 0x00 | seq (u64 BE)` → the events of one command, or a run
//!   of the SKU's records from `seq` on (`codec::encode_run`: the records of one SKU
//!   in one batch cost one key). A SKU's records form one contiguous key range, so a
//!   SKU can be replayed, exported or trimmed on its own.
//! - `snapshots`: `sku id` → the SKU's whole state as of some seq. Writing a snapshot
//!   deletes the journal records it covers in the same atomic batch.
//!
//! **Group commit.** One writer thread takes every pending write from every SKU
//! actor, puts them in a single `WriteBatch` and writes it with `sync = true`; only
//! then are the writes' completions run, and those answer the callers. While one
//! fsync runs the next batch fills up, so a busy node pays one fsync for thousands of
//! requests. The queue is FIFO, so each SKU's records reach disk in the order its
//! actor applied them.
//!
//! **Answers.** Given a runtime, the writer hands each written batch to one task on
//! it, which runs the batch's completions there. Woken from the writer thread, every
//! caller would be a remote wake-up, and a busy tokio worker takes one task from its
//! remote queue only every few dozen local ones: with every connection of a crowd
//! holding a ready request, answers waited behind them (25-35 ms for each order on a
//! saturated node) and an order bound going by that time shut out nearly everyone.
//! Run on the runtime, one task per batch is woken from outside and its callers are
//! woken locally. That task still waits its turn: the time from a batch being written
//! to its completions running is `keydrop_journal_answer_wait_seconds`, near zero on
//! a node with spare CPU and about one round of the run queue on a saturated one.
//!
//! **Failure.** A batch that fails to write fails every request in it, and the SKUs
//! involved are fenced: later writes from the same actor epoch are refused until the
//! actor has reloaded its state from disk (see `Resync` in the actor). Memory never
//! stays ahead of disk, and nothing is acknowledged that was not written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rocksdb::{
    ColumnFamilyDescriptor, DBCompressionType, Direction, Env, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use thiserror::Error;

use crate::codec::{self, CodecError};
use crate::ids::SkuId;
use crate::limits::{JOURNAL_BATCH_REQUESTS_MAX, SNAPSHOT_RECORD_BYTES_MAX};
use crate::sku::Sku;

const CF_JOURNAL: &str = "journal";
const CF_SNAPSHOTS: &str = "snapshots";

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("opening the journal at {path}: {message}")]
    Open { path: String, message: String },
    #[error("journal write failed: {0}")]
    Write(String),
    #[error("journal read failed: {0}")]
    Read(String),
    /// The SKU's previous write failed; it is reloading from disk.
    #[error("write refused: the SKU is resynchronising after a failed write")]
    Fenced,
    #[error("the journal is closed")]
    Closed,
    #[error("journal holds {} corrupt record(s); first: {}", .0.len(), .0.first().map(|r| r.to_string()).unwrap_or_default())]
    Corrupt(Vec<CorruptRecord>),
}

/// A record recovery could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord {
    pub sku: Option<SkuId>,
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for CorruptRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sku = self.sku.as_ref().map(SkuId::as_str).unwrap_or("?");
        match self.seq {
            Some(seq) => write!(f, "SKU {sku} record {seq}: {}", self.problem),
            None => write!(f, "SKU {sku} snapshot: {}", self.problem),
        }
    }
}

/// Makes upcoming batch writes fail, to test that a failed write loses nothing
/// acknowledged and leaves memory equal to disk; or holds them, as a stalled disk
/// would, to test what fills up meanwhile.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    failing_writes: Arc<AtomicU64>,
    failing_loads: Arc<AtomicU64>,
    holding_writes: Arc<AtomicBool>,
}

impl FaultInjector {
    pub fn fail_next_writes(&self, count: u64) {
        self.failing_writes.store(count, Ordering::SeqCst);
    }

    /// Makes the next reloads of a SKU from disk (after a failed write) fail, as a
    /// disk failing reads as well would.
    pub fn fail_next_loads(&self, count: u64) {
        self.failing_loads.store(count, Ordering::SeqCst);
    }

    fn take_load(&self) -> bool {
        self.failing_loads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// The writer takes no batch to disk until [`FaultInjector::release_writes`].
    pub fn hold_writes(&self) {
        self.holding_writes.store(true, Ordering::SeqCst);
    }

    pub fn release_writes(&self) {
        self.holding_writes.store(false, Ordering::SeqCst);
    }

    fn wait_while_held(&self) {
        while self.holding_writes.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn take(&self) -> bool {
        self.failing_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// How the journal writer batches.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Requests per `WriteBatch` (and so per fsync). 1 turns group commit off: the
    /// benchmark uses that as its baseline.
    pub batch_requests_max: usize,
    /// How long the writer may hold a batch that is small next to the previous one,
    /// waiting for the buyers still on their way, before it syncs. An fsync costs
    /// the same CPU and device time for 2 requests as for 40, so under load a short
    /// wait buys fewer, fuller syncs; with no load (the previous batch was small too)
    /// it never waits. Zero turns it off.
    pub linger: Duration,
    pub fault_injector: Option<FaultInjector>,
}

/// The linger is spent in steps of this, ending at the first step that brings
/// nothing new: a trickle is not held for the whole linger.
const LINGER_STEP: Duration = Duration::from_micros(50);

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            batch_requests_max: JOURNAL_BATCH_REQUESTS_MAX,
            linger: Duration::from_micros(200),
            fault_injector: None,
        }
    }
}

/// Totals since the journal opened, for benchmarks and diagnostics: how much the
/// writer batched and where its time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JournalStats {
    pub batches: u64,
    pub requests: u64,
    /// Time inside RocksDB's synced write (WAL append + fsync).
    pub write_seconds: f64,
    /// Time running completions (answering callers) after each write.
    pub completion_seconds: f64,
    /// Time holding small batches for more requests (see [`JournalOptions::linger`]).
    pub linger_seconds: f64,
}

#[derive(Default)]
struct JournalCounters {
    batches: AtomicU64,
    requests: AtomicU64,
    write_nanos: AtomicU64,
    completion_nanos: AtomicU64,
    linger_nanos: AtomicU64,
}

/// Runs once the write it belongs to is durable, or has failed.
pub type Completion = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

pub enum JournalOp {
    /// The events of one command, at the SKU's next sequence number.
    Append { seq: u64, record: Vec<u8> },
    /// The SKU's whole state at `seq`; replaces the records up to `seq`.
    Snapshot { seq: u64, record: Vec<u8> },
    /// Writes nothing; completes once every write queued before it is durable.
    Barrier,
}

pub struct JournalWrite {
    pub sku: SkuId,
    /// The actor's incarnation, bumped each time it reloads after a failed write;
    /// `None` for a write made outside any actor, which is never fenced.
    pub epoch: Option<u64>,
    pub op: JournalOp,
    pub done: Completion,
}

enum WriterMsg {
    Write(JournalWrite),
    Shutdown,
}

/// A SKU rebuilt from disk, with the sequence number of its last record.
pub struct RecoveredSku {
    pub sku: Sku,
    pub seq: u64,
    /// Journal records replayed on top of the snapshot.
    pub records_replayed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub skus: usize,
    pub snapshots_loaded: usize,
    pub records_replayed: u64,
    pub cards: u64,
    pub orders: u64,
    pub elapsed: Duration,
}

/// Ceiling on flush and compaction writes. A memtable flush (64 MiB in, about
/// 40 MB out) then takes about a second of the disk instead of a 200 ms burst, and a
/// drop at 50,000 orders/s writes the journal at about 7 MB/s (about 130 bytes per
/// order in a flushed memtable), far below it.
const BACKGROUND_WRITE_BYTES_PER_SEC: i64 = 48 << 20;
/// Table files are handed to the disk every this many bytes as they are written,
/// not all at once by the sync that ends the flush.
const BACKGROUND_SYNC_BYTES: u64 = 1 << 20;
/// Obsolete WAL files kept to be written over instead of created afresh.
const RECYCLED_LOG_FILES: usize = 4;
/// A synced write that takes this long gets a log line: every order in it waited
/// that long, and the line's time lines it up with the slow second a buyer saw.
const SLOW_WRITE: Duration = Duration::from_millis(50);

pub struct Journal {
    /// Taken out and dropped by [`Journal::close`], so the RocksDB folder is released
    /// at close even while actors still hold this `Journal`.
    db: std::sync::RwLock<Option<Arc<DB>>>,
    sender: mpsc::Sender<WriterMsg>,
    queued: Arc<AtomicUsize>,
    counters: Arc<JournalCounters>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    fault: FaultInjector,
}

impl Journal {
    /// Opens (or creates) the journal in `path` and starts the writer thread. SKUs
    /// whose write fails are sent to `resync` so their actors reload. With
    /// `answer_on`, completions run on a task of that runtime (see the module doc);
    /// without, on the writer thread.
    pub fn open(
        path: &Path,
        options: JournalOptions,
        resync: tokio::sync::mpsc::UnboundedSender<(SkuId, u64)>,
        answer_on: Option<tokio::runtime::Handle>,
    ) -> Result<Journal, JournalError> {
        let open_error = |message: String| JournalError::Open {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(path).map_err(|e| open_error(e.to_string()))?;
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.increase_parallelism(2);
        // Flushes and compactions run on what the request path leaves: a 64 MiB
        // memtable flush is ~200 ms of CPU, and at normal priority it took a whole
        // core from buyers on a two-core machine (20-100 ms stalls at half load).
        // The spare memtables (below) absorb a flush that waits.
        let mut background = Env::new().map_err(|e| open_error(e.to_string()))?;
        background.lower_thread_pool_cpu_priority();
        background.lower_high_priority_thread_pool_cpu_priority();
        db_options.set_env(&background);
        db_options.set_compression_type(DBCompressionType::Lz4);
        // Group commit makes the writes large and few; a bigger memtable means fewer
        // flushes competing with them for the two cores.
        db_options.set_write_buffer_size(64 << 20);
        // A flush wrote its 40-70 MB table in one burst that the buyers' next fsyncs
        // queued behind (24-49 ms stalls at half load). Metered and written back as
        // it goes, the table trickles out between them; WAL writes are not metered.
        db_options.set_ratelimiter(BACKGROUND_WRITE_BYTES_PER_SEC, 100_000, 10);
        db_options.set_bytes_per_sync(BACKGROUND_SYNC_BYTES);
        // A reused WAL file is overwritten in place: an fsync then carries no size
        // change (no inode write) and no block allocation, and no 64 MB file is
        // unlinked (and, on a disk mounted with discard, trimmed) beside the buyers'
        // syncs. Recovery across recycled files can drop data only where sequence
        // numbers skip the WAL (writes with the WAL off, file ingestion) or a WAL's
        // tail was never synced (RocksDB's own crash test, facebook/rocksdb#12918);
        // here every write goes through the WAL with sync on, and the crash test
        // (tests/crash.rs) kills the process with recycling on.
        db_options.set_recycle_log_file_num(RECYCLED_LOG_FILES);
        let cf = |name: &str| {
            let mut cf_options = Options::default();
            cf_options.set_compression_type(DBCompressionType::Lz4);
            cf_options.set_write_buffer_size(64 << 20);
            // A drop writes faster than two cores flush: with RocksDB's default of two
            // memtables, a full one waiting for its flush stalls every write (and so
            // every buyer) for hundreds of milliseconds.
            cf_options.set_max_write_buffer_number(6);
            ColumnFamilyDescriptor::new(name, cf_options)
        };
        let db = DB::open_cf_descriptors(&db_options, path, vec![cf(CF_JOURNAL), cf(CF_SNAPSHOTS)])
            .map_err(|e| open_error(e.to_string()))?;
        let db = Arc::new(db);
        let (sender, receiver) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(JournalCounters::default());
        let answers = Answers::start(answer_on, Arc::clone(&counters));
        let fault = options.fault_injector.clone().unwrap_or_default();
        let writer = {
            let db = Arc::clone(&db);
            let queued = Arc::clone(&queued);
            let counters = Arc::clone(&counters);
            std::thread::Builder::new()
                .name("keydrop-journal".into())
                .spawn(move || {
                    run_writer(
                        &db, &receiver, &queued, &counters, &options, &resync, &answers,
                    )
                })
                .map_err(|e| open_error(e.to_string()))?
        };
        Ok(Journal {
            db: std::sync::RwLock::new(Some(db)),
            sender,
            queued,
            counters,
            closed: AtomicBool::new(false),
            writer: Mutex::new(Some(writer)),
            fault,
        })
    }

    pub fn stats(&self) -> JournalStats {
        let c = &self.counters;
        JournalStats {
            batches: c.batches.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            write_seconds: c.write_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            completion_seconds: c.completion_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            linger_seconds: c.linger_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Writes waiting for the writer thread.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues a write. Its completion runs once the write is durable or has failed,
    /// on the answering task (see the module doc) or else on the writer thread; it
    /// must be quick and must not block.
    pub fn submit(&self, write: JournalWrite) {
        if self.closed.load(Ordering::Acquire) {
            (write.done)(Err(JournalError::Closed));
            return;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(WriterMsg::Write(write))) =
            self.sender.send(WriterMsg::Write(write))
        {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            (write.done)(Err(JournalError::Closed));
        }
    }

    /// Writes one record and waits for it to be durable (for the rare writes made
    /// outside an actor, such as creating a SKU).
    pub async fn write_now(&self, sku: SkuId, op: JournalOp) -> Result<(), JournalError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(JournalWrite {
            sku,
            epoch: None,
            op,
            done: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        });
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Stops the writer after it has written everything queued before this call.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.sender.send(WriterMsg::Shutdown);
        // These locks only guard an Option of a handle: a panic elsewhere while one
        // was held cannot have left it half-written, so a poisoned lock is used as is.
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
        // The writer held the only other handle; this closes the database.
        drop(
            self.db
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }

    fn db(&self) -> Result<Arc<DB>, JournalError> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(JournalError::Closed)
    }

    /// Rebuilds every SKU: its snapshot, then the journal records after it. Refuses
    /// to start over corrupt records rather than serve a SKU with a hole in its past.
    pub fn recover(&self) -> Result<(Vec<RecoveredSku>, RecoveryReport), JournalError> {
        let started = Instant::now();
        let mut report = RecoveryReport::default();
        let mut corrupt = Vec::new();
        let mut skus: HashMap<SkuId, Replay> = HashMap::new();
        let db = self.db()?;
        for item in db.iterator_cf(cf(&db, CF_SNAPSHOTS), IteratorMode::Start) {
            let (key, value) = item.map_err(|e| JournalError::Read(e.to_string()))?;
            match decode_snapshot_entry(&key, &value) {
                Ok((id, replay)) => {
                    report.snapshots_loaded += 1;
                    skus.insert(id, replay);
                }
                Err(record) => corrupt.push(record),
            }
        }
        for item in db.iterator_cf(cf(&db, CF_JOURNAL), IteratorMode::Start) {
            let (key, value) = item.map_err(|e| JournalError::Read(e.to_string()))?;
            let (id, seq) = match codec::parse_journal_key(&key) {
                Ok(parsed) => parsed,
                Err(error) => {
                    corrupt.push(CorruptRecord {
                        sku: None,
                        seq: None,
                        problem: error.to_string(),
                    });
                    continue;
                }
            };
            let replay = skus.entry(id.clone()).or_insert_with(|| Replay {
                sku: None,
                seq: 0,
                replayed: 0,
                broken: false,
            });
            match replay.feed(&id, seq, &value) {
                Ok(records) => report.records_replayed += records,
                Err(problem) => corrupt.push(CorruptRecord {
                    sku: Some(id),
                    seq: Some(seq),
                    problem,
                }),
            }
        }
        if !corrupt.is_empty() {
            return Err(JournalError::Corrupt(corrupt));
        }
        let mut recovered = Vec::with_capacity(skus.len());
        for (id, replay) in skus {
            let Some(sku) = replay.sku else {
                return Err(JournalError::Corrupt(vec![CorruptRecord {
                    sku: Some(id),
                    seq: None,
                    problem: "no definition found".into(),
                }]));
            };
            let counts = sku.counts();
            report.cards += counts.imported;
            report.orders += sku.order_count() as u64;
            recovered.push(RecoveredSku {
                sku,
                seq: replay.seq,
                records_replayed: replay.replayed,
            });
        }
        report.skus = recovered.len();
        report.elapsed = started.elapsed();
        Ok((recovered, report))
    }

    /// Rebuilds one SKU from disk, as [`Journal::recover`] does for all of them.
    pub fn load_sku(&self, id: &SkuId) -> Result<Option<RecoveredSku>, JournalError> {
        if self.fault.take_load() {
            return Err(JournalError::Read("injected read failure".to_string()));
        }
        let db = self.db()?;
        let snapshot = db
            .get_cf(cf(&db, CF_SNAPSHOTS), codec::snapshot_key(id))
            .map_err(|e| JournalError::Read(e.to_string()))?;
        let mut replay = match snapshot {
            Some(value) => {
                decode_snapshot_entry(id.as_str().as_bytes(), &value)
                    .map_err(|record| JournalError::Corrupt(vec![record]))?
                    .1
            }
            None => Replay {
                sku: None,
                seq: 0,
                replayed: 0,
                broken: false,
            },
        };
        let prefix = codec::journal_prefix(id);
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        for item in db.iterator_cf(cf(&db, CF_JOURNAL), mode) {
            let (key, value) = item.map_err(|e| JournalError::Read(e.to_string()))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (_, seq) = codec::parse_journal_key(&key).map_err(|e| {
                JournalError::Corrupt(vec![CorruptRecord {
                    sku: Some(id.clone()),
                    seq: None,
                    problem: e.to_string(),
                }])
            })?;
            replay.feed(id, seq, &value).map_err(|problem| {
                JournalError::Corrupt(vec![CorruptRecord {
                    sku: Some(id.clone()),
                    seq: Some(seq),
                    problem,
                }])
            })?;
        }
        Ok(replay.sku.map(|sku| RecoveredSku {
            sku,
            seq: replay.seq,
            records_replayed: replay.replayed,
        }))
    }

    /// Raw access for tests that tamper with records or scan the files.
    pub fn raw_put_journal_record(
        &self,
        sku: &SkuId,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), JournalError> {
        let db = self.db()?;
        db.put_cf(cf(&db, CF_JOURNAL), codec::journal_key(sku, seq), bytes)
            .map_err(|e| JournalError::Write(e.to_string()))
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column families are created at open")
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

fn decode_snapshot_entry(key: &[u8], value: &[u8]) -> Result<(SkuId, Replay), CorruptRecord> {
    let id = codec::parse_snapshot_key(key).map_err(|e| CorruptRecord {
        sku: None,
        seq: None,
        problem: e.to_string(),
    })?;
    let corrupt = |problem: String| CorruptRecord {
        sku: Some(id.clone()),
        seq: None,
        problem,
    };
    let (seq, snapshot) =
        codec::decode_snapshot(value).map_err(|e: CodecError| corrupt(e.to_string()))?;
    if snapshot.id != id {
        return Err(corrupt(format!("snapshot is of SKU {}", snapshot.id)));
    }
    let sku = Sku::from_snapshot(snapshot).map_err(corrupt)?;
    Ok((
        id,
        Replay {
            sku: Some(sku),
            seq,
            replayed: 0,
            broken: false,
        },
    ))
}

/// One SKU being rebuilt, record by record.
struct Replay {
    sku: Option<Sku>,
    seq: u64,
    replayed: u64,
    /// Set at the first bad record: nothing after a hole can be trusted.
    broken: bool,
}

impl Replay {
    /// Applies one journal value, the record at `seq` or the run of records from
    /// `seq` on; returns how many records it held.
    fn feed(&mut self, id: &SkuId, seq: u64, value: &[u8]) -> Result<u64, String> {
        if self.broken {
            return Err("follows a corrupt record".into());
        }
        let result = self.feed_value(id, seq, value);
        self.broken = result.is_err();
        result
    }

    fn feed_value(&mut self, id: &SkuId, first_seq: u64, value: &[u8]) -> Result<u64, String> {
        let records = codec::split_journal_value(value).map_err(|e| e.to_string())?;
        let in_run = records.len() > 1;
        for (offset, record) in (0u64..).zip(&records) {
            let seq = first_seq
                .checked_add(offset)
                .ok_or("a run past the last sequence number")?;
            self.feed_record(id, seq, record).map_err(|problem| {
                if in_run {
                    format!("record {seq} of the run from {first_seq}: {problem}")
                } else {
                    problem
                }
            })?;
        }
        Ok(records.len() as u64)
    }

    fn feed_record(&mut self, id: &SkuId, seq: u64, value: &[u8]) -> Result<(), String> {
        if seq <= self.seq {
            // Covered by the snapshot (a trim interrupted by a crash cannot leave
            // these, but they would be harmless).
            return Ok(());
        }
        if seq != self.seq + 1 {
            return Err(format!("gap: record {} missing", self.seq + 1));
        }
        let events = codec::decode_events(value).map_err(|e| e.to_string())?;
        for event in &events {
            match &mut self.sku {
                Some(sku) => sku.apply_checked(event)?,
                None => {
                    self.sku = Some(
                        Sku::from_first_event(id.clone(), event)
                            .ok_or("first record is not a definition")?,
                    );
                }
            }
        }
        self.seq = seq;
        self.replayed += 1;
        Ok(())
    }
}

/// When the writer holds a batch before syncing it: only while the batch is under
/// half the previous one (so an idle journal never waits), in steps of
/// [`LINGER_STEP`], stopping at the first step that brought nothing and once the
/// budget is spent.
struct Linger {
    budget: Duration,
    spent: Duration,
    previous_batch: usize,
    batch_max: usize,
    /// Batch size when the last step began; `None` before the first.
    at_last_step: Option<usize>,
}

impl Linger {
    fn new(budget: Duration, previous_batch: usize, batch_max: usize) -> Self {
        Linger {
            budget,
            spent: Duration::ZERO,
            previous_batch,
            batch_max,
            at_last_step: None,
        }
    }

    /// How long to sleep before looking again, or `None` to sync now.
    fn next_step(&mut self, pending: usize) -> Option<Duration> {
        let stalled = self.at_last_step.is_some_and(|before| pending <= before);
        if stalled
            || self.spent >= self.budget
            || pending >= self.batch_max
            || pending * 2 >= self.previous_batch
        {
            return None;
        }
        let step = LINGER_STEP.min(self.budget - self.spent);
        self.spent += step;
        self.at_last_step = Some(pending);
        Some(step)
    }
}

/// Moves what is already queued into `pending`, up to `batch_max`; true once a
/// shutdown was taken.
fn take_queued(
    receiver: &mpsc::Receiver<WriterMsg>,
    pending: &mut Vec<JournalWrite>,
    batch_max: usize,
) -> bool {
    while pending.len() < batch_max {
        match receiver.try_recv() {
            Ok(WriterMsg::Write(write)) => pending.push(write),
            Ok(WriterMsg::Shutdown) => return true,
            Err(_) => return false,
        }
    }
    false
}

/// Completions of one batch, all with the same outcome.
struct AnsweredBatch {
    writes: Vec<JournalWrite>,
    /// `None`: durable.
    failure: Option<JournalError>,
    /// When the writer was done with it.
    written_at: Instant,
}

impl AnsweredBatch {
    fn run(self, counters: &JournalCounters) {
        let started = Instant::now();
        // The wait for a turn on the async workers: on a saturated node this, not
        // the fsync, is what a durable order waits for.
        metrics::histogram!("keydrop_journal_answer_wait_seconds").record(
            started
                .saturating_duration_since(self.written_at)
                .as_secs_f64(),
        );
        for write in self.writes {
            let outcome = match &self.failure {
                None => Ok(()),
                Some(error) => Err(error.for_each_write()),
            };
            (write.done)(outcome);
        }
        counters
            .completion_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Where the writer sends completions: to the answering task, or nowhere (it runs
/// them itself). FIFO either way, so a SKU's callers are answered in the order its
/// records were written.
struct Answers {
    task: Option<tokio::sync::mpsc::UnboundedSender<AnsweredBatch>>,
    counters: Arc<JournalCounters>,
}

impl Answers {
    fn start(runtime: Option<tokio::runtime::Handle>, counters: Arc<JournalCounters>) -> Self {
        let task = runtime.map(|runtime| {
            let (sender, mut batches) = tokio::sync::mpsc::unbounded_channel::<AnsweredBatch>();
            let counters = Arc::clone(&counters);
            runtime.spawn(async move {
                while let Some(batch) = batches.recv().await {
                    batch.run(&counters);
                }
            });
            sender
        });
        Answers { task, counters }
    }

    /// Runs the completions, on the answering task when it is still there (a
    /// runtime shutting down drops it) and here otherwise, so none is lost.
    fn send(&self, writes: Vec<JournalWrite>, failure: Option<JournalError>) {
        if writes.is_empty() {
            return;
        }
        let batch = AnsweredBatch {
            writes,
            failure,
            written_at: Instant::now(),
        };
        let batch = match &self.task {
            Some(task) => match task.send(batch) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::SendError(batch)) => batch,
            },
            None => batch,
        };
        batch.run(&self.counters);
    }
}

impl JournalError {
    /// The same failure, for each write of a failed batch.
    fn for_each_write(&self) -> JournalError {
        match self {
            JournalError::Write(message) => JournalError::Write(message.clone()),
            JournalError::Fenced => JournalError::Fenced,
            JournalError::Closed => JournalError::Closed,
            other => JournalError::Write(other.to_string()),
        }
    }
}

/// The `WriteBatch` for the writes of one group commit. Each SKU's appends with
/// consecutive sequence numbers become one run under the first one's key; a run is
/// closed before a snapshot of its SKU, whose trim of the records it covers
/// (`..=seq`) then takes whole runs, never part of one.
fn batch_of(
    writes: &[JournalWrite],
    journal_cf: &rocksdb::ColumnFamily,
    snapshots_cf: &rocksdb::ColumnFamily,
) -> WriteBatch {
    let mut batch = WriteBatch::default();
    let mut runs = Runs::default();
    for write in writes {
        match &write.op {
            JournalOp::Append { seq, record } => {
                runs.append(&write.sku, *seq, record, &mut batch, journal_cf);
            }
            JournalOp::Snapshot { seq, record } => {
                runs.close(&write.sku, &mut batch, journal_cf);
                batch.put_cf(snapshots_cf, codec::snapshot_key(&write.sku), record);
                batch.delete_range_cf(
                    journal_cf,
                    codec::journal_key(&write.sku, 0),
                    codec::journal_key(&write.sku, seq + 1),
                );
            }
            JournalOp::Barrier => {}
        }
    }
    runs.close_all(&mut batch, journal_cf);
    batch
}

/// Each SKU's open run of records while a batch is built.
#[derive(Default)]
struct Runs<'w> {
    open: HashMap<&'w SkuId, Run<'w>, foldhash::fast::RandomState>,
}

struct Run<'w> {
    first_seq: u64,
    records: Vec<&'w [u8]>,
    /// The records' bytes, so a run stays far under what its framing can count.
    bytes: usize,
}

/// A run is closed before it would grow past this; the next record starts another
/// under its own key. A batch of small order records never comes near it.
const RUN_BYTES_MAX: usize = 16 << 20;

impl<'w> Runs<'w> {
    fn append(
        &mut self,
        sku: &'w SkuId,
        seq: u64,
        record: &'w [u8],
        batch: &mut WriteBatch,
        journal_cf: &rocksdb::ColumnFamily,
    ) {
        if let Some(run) = self.open.get_mut(sku) {
            let next = run.first_seq + run.records.len() as u64 == seq;
            if next && run.bytes + record.len() <= RUN_BYTES_MAX {
                run.records.push(record);
                run.bytes += record.len();
                return;
            }
            // Not the next record (an actor that reloaded after a failed write starts
            // again from what is on disk), or a run full: what came before is a run
            // of its own.
            self.close(sku, batch, journal_cf);
        }
        self.open.insert(
            sku,
            Run {
                first_seq: seq,
                records: vec![record],
                bytes: record.len(),
            },
        );
    }

    fn close(&mut self, sku: &SkuId, batch: &mut WriteBatch, journal_cf: &rocksdb::ColumnFamily) {
        if let Some(run) = self.open.remove(sku) {
            run.put(sku, batch, journal_cf);
        }
    }

    fn close_all(self, batch: &mut WriteBatch, journal_cf: &rocksdb::ColumnFamily) {
        for (sku, run) in self.open {
            run.put(sku, batch, journal_cf);
        }
    }
}

impl Run<'_> {
    fn put(&self, sku: &SkuId, batch: &mut WriteBatch, journal_cf: &rocksdb::ColumnFamily) {
        let key = codec::journal_key(sku, self.first_seq);
        match self.records.as_slice() {
            [record] => batch.put_cf(journal_cf, key, record),
            records => batch.put_cf(journal_cf, key, codec::encode_run(records.iter().copied())),
        }
    }
}

fn run_writer(
    db: &DB,
    receiver: &mpsc::Receiver<WriterMsg>,
    queued: &AtomicUsize,
    counters: &JournalCounters,
    options: &JournalOptions,
    resync: &tokio::sync::mpsc::UnboundedSender<(SkuId, u64)>,
    answers: &Answers,
) {
    let journal_cf = db.cf_handle(CF_JOURNAL).expect("journal column family");
    let snapshots_cf = db.cf_handle(CF_SNAPSHOTS).expect("snapshots column family");
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    // SKU → the newest actor epoch whose writes are refused.
    let mut fenced: HashMap<SkuId, u64> = HashMap::new();
    let batch_max = options
        .batch_requests_max
        .clamp(1, JOURNAL_BATCH_REQUESTS_MAX);
    let fault = options.fault_injector.clone().unwrap_or_default();
    let mut pending: Vec<JournalWrite> = Vec::with_capacity(batch_max);
    let mut shutting_down = false;
    let mut previous_batch = 0;
    while !shutting_down {
        match receiver.recv() {
            Ok(WriterMsg::Write(write)) => pending.push(write),
            Ok(WriterMsg::Shutdown) | Err(_) => break,
        }
        shutting_down = take_queued(receiver, &mut pending, batch_max);
        let mut linger = Linger::new(options.linger, previous_batch, batch_max);
        while !shutting_down {
            let Some(step) = linger.next_step(pending.len()) else {
                break;
            };
            // Sleeping, not blocking on the channel: senders do not wake the writer
            // for each request, and those that arrive meanwhile join this batch.
            std::thread::sleep(step);
            shutting_down = take_queued(receiver, &mut pending, batch_max);
        }
        if linger.spent > Duration::ZERO {
            counters
                .linger_nanos
                .fetch_add(linger.spent.as_nanos() as u64, Ordering::Relaxed);
            metrics::histogram!("keydrop_journal_linger_seconds")
                .record(linger.spent.as_secs_f64());
        }
        let taken = pending.len();
        previous_batch = taken;
        let mut accepted: Vec<JournalWrite> = Vec::with_capacity(taken);
        let mut refused: Vec<JournalWrite> = Vec::new();
        let mut too_large: Vec<JournalWrite> = Vec::new();
        for write in pending.drain(..) {
            if let (Some(&fenced_epoch), Some(epoch)) = (fenced.get(&write.sku), write.epoch) {
                if epoch <= fenced_epoch {
                    refused.push(write);
                    continue;
                }
                fenced.remove(&write.sku);
            }
            if let JournalOp::Snapshot { record, .. } = &write.op {
                if record.len() > SNAPSHOT_RECORD_BYTES_MAX {
                    tracing::error!(
                        sku = %write.sku,
                        bytes = record.len(),
                        "snapshot too large for one RocksDB value; not written, the journal records it would cover are kept"
                    );
                    too_large.push(write);
                    continue;
                }
            }
            accepted.push(write);
        }
        let batch = batch_of(&accepted, journal_cf, snapshots_cf);
        // Barriers alone write nothing: no fsync to time or count.
        let writes = !batch.is_empty();
        answers.send(refused, Some(JournalError::Fenced));
        answers.send(
            too_large,
            Some(JournalError::Write(format!(
                "snapshot over {SNAPSHOT_RECORD_BYTES_MAX} bytes"
            ))),
        );
        fault.wait_while_held();
        let started = Instant::now();
        let result = if fault.take() {
            Err("injected write failure".to_string())
        } else if batch.is_empty() {
            // Only barriers: everything before them was made durable by earlier batches.
            Ok(())
        } else {
            db.write_opt(batch, &sync).map_err(|e| e.to_string())
        };
        let write_time = started.elapsed();
        if writes {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters
                .requests
                .fetch_add(accepted.len() as u64, Ordering::Relaxed);
            counters
                .write_nanos
                .fetch_add(write_time.as_nanos() as u64, Ordering::Relaxed);
            metrics::histogram!("keydrop_journal_fsync_seconds").record(write_time.as_secs_f64());
            if write_time >= SLOW_WRITE {
                tracing::warn!(
                    write_ms = write_time.as_millis() as u64,
                    requests = accepted.len(),
                    "slow journal write (WAL append and fsync); every request in the batch waited for it"
                );
            }
            metrics::histogram!("keydrop_journal_batch_requests").record(accepted.len() as f64);
        }
        queued.fetch_sub(taken, Ordering::Relaxed);
        metrics::gauge!("keydrop_journal_queue_depth").set(queued.load(Ordering::Relaxed) as f64);
        match result {
            Ok(()) => answers.send(accepted, None),
            Err(message) => {
                metrics::counter!("keydrop_journal_write_failures_total").increment(1);
                tracing::error!(requests = accepted.len(), error = %message, "journal write failed; failing the batch and reloading its SKUs");
                for write in &accepted {
                    if let Some(epoch) = write.epoch {
                        let already = fenced
                            .get(&write.sku)
                            .is_some_and(|&fenced_epoch| fenced_epoch >= epoch);
                        if !already {
                            fenced.insert(write.sku.clone(), epoch);
                            // The actor ignores a resync for an epoch it has left behind.
                            let _ = resync.send((write.sku.clone(), epoch));
                        }
                    }
                }
                answers.send(accepted, Some(JournalError::Write(message)));
            }
        }
    }
    // Anything still queued after shutdown is refused, never silently dropped.
    let mut left: Vec<JournalWrite> = Vec::new();
    for message in receiver.try_iter() {
        if let WriterMsg::Write(write) = message {
            queued.fetch_sub(1, Ordering::Relaxed);
            left.push(write);
        }
    }
    answers.send(left, Some(JournalError::Closed));
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_micros(200);

    /// Nice values of this process's threads with the given name.
    fn nice_of_threads(name: &str) -> Vec<i64> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let path = task.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                if comm.trim() != name {
                    return None;
                }
                // The name in field 2 has no spaces here, so fields split plainly.
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                stat.split_whitespace().nth(18)?.parse().ok()
            })
            .collect()
    }

    #[test]
    fn memtable_flushes_run_at_the_lowest_cpu_priority() {
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(dir.path(), JournalOptions::default(), resync, None).unwrap();
        let sku = SkuId::parse("nice").unwrap();
        journal.raw_put_journal_record(&sku, 1, b"record").unwrap();
        let db = journal.db().unwrap();
        // A thread takes its pool's priority when it runs a job: flush once.
        db.flush_cf(cf(&db, CF_JOURNAL)).unwrap();
        let flushers = nice_of_threads("rocksdb:high");
        assert!(!flushers.is_empty(), "no flush thread");
        assert!(flushers.iter().all(|&nice| nice == 19), "{flushers:?}");
    }

    /// Submits one record and returns the name of the thread its completion ran
    /// on, and what it was told.
    fn answered_on(journal: &Journal, seq: u64) -> (String, Result<(), JournalError>) {
        let (tx, rx) = std::sync::mpsc::channel();
        journal.submit(JournalWrite {
            sku: SkuId::parse("answers").unwrap(),
            epoch: None,
            op: JournalOp::Append {
                seq,
                record: b"record".to_vec(),
            },
            done: Box::new(move |result| {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                let _ = tx.send((thread, result));
            }),
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("no answer")
    }

    /// A one-worker runtime whose thread names tell answers run on it apart.
    fn answering_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("answering-runtime")
            .build()
            .unwrap()
    }

    #[test]
    fn answers_run_on_the_runtime_when_given_one_and_on_the_writer_otherwise() {
        let runtime = answering_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(
            &dir.path().join("on-runtime"),
            JournalOptions::default(),
            resync.clone(),
            Some(runtime.handle().clone()),
        )
        .unwrap();
        let (thread, result) = answered_on(&journal, 1);
        assert_eq!(thread, "answering-runtime");
        assert!(result.is_ok());

        // A runtime shut down drops the answering task: answers fall back to the
        // writer thread rather than being lost.
        runtime.shutdown_timeout(Duration::from_secs(5));
        let (thread, result) = answered_on(&journal, 2);
        assert_eq!(thread, "keydrop-journal");
        assert!(result.is_ok());
        journal.close();

        let journal = Journal::open(
            &dir.path().join("no-runtime"),
            JournalOptions::default(),
            resync,
            None,
        )
        .unwrap();
        let (thread, result) = answered_on(&journal, 1);
        assert_eq!(thread, "keydrop-journal");
        assert!(result.is_ok());
        journal.close();
    }

    #[test]
    fn a_failed_batch_is_answered_with_its_error_on_the_runtime() {
        let runtime = answering_runtime();
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let fault = FaultInjector::default();
        let journal = Journal::open(
            dir.path(),
            JournalOptions {
                fault_injector: Some(fault.clone()),
                ..JournalOptions::default()
            },
            resync,
            Some(runtime.handle().clone()),
        )
        .unwrap();
        fault.fail_next_writes(1);
        let (thread, result) = answered_on(&journal, 1);
        assert_eq!(thread, "answering-runtime");
        assert!(
            matches!(result, Err(JournalError::Write(ref m)) if m.contains("injected")),
            "{result:?}"
        );
        let (_, result) = answered_on(&journal, 1);
        assert!(result.is_ok(), "the next batch is written: {result:?}");
        journal.close();
    }

    /// Records `from..to` of SKU `recycle`, each written to the WAL (not synced: the
    /// process does not die, so the page cache keeps them).
    fn put_records(journal: &Journal, from: u64, to: u64) {
        let sku = SkuId::parse("recycle").unwrap();
        for seq in from..to {
            journal
                .raw_put_journal_record(&sku, seq, format!("record {seq}").as_bytes())
                .unwrap();
        }
    }

    fn flush_all(journal: &Journal) {
        let db = journal.db().unwrap();
        for name in [CF_JOURNAL, CF_SNAPSHOTS] {
            db.flush_cf(cf(&db, name)).unwrap();
        }
    }

    /// One batch of interleaved writes: each SKU's consecutive records go under one
    /// key, a gap starts a new run, and a snapshot trims the run before it whole
    /// (closed before the trim, it cannot outlive it) and nothing after it.
    #[test]
    fn a_batch_keeps_each_skus_consecutive_records_as_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(dir.path(), JournalOptions::default(), resync, None).unwrap();
        let (a, b) = (SkuId::parse("a").unwrap(), SkuId::parse("b").unwrap());
        let write = |sku: &SkuId, op| JournalWrite {
            sku: sku.clone(),
            epoch: None,
            op,
            done: Box::new(|_| {}),
        };
        let append = |sku: &SkuId, seq: u64| {
            write(
                sku,
                JournalOp::Append {
                    seq,
                    record: format!("{sku}{seq}").into_bytes(),
                },
            )
        };
        let writes = vec![
            append(&a, 1),
            append(&b, 7),
            append(&a, 2),
            append(&b, 8),
            write(
                &a,
                JournalOp::Snapshot {
                    seq: 2,
                    record: b"a as of 2".to_vec(),
                },
            ),
            append(&a, 3),
            write(&b, JournalOp::Barrier),
            append(&a, 4),
            append(&b, 10),
        ];
        let stored: Vec<(Vec<u8>, Vec<Vec<u8>>)> = journal_after_one_batch(&journal, &writes)
            .into_iter()
            .map(|(key, value)| {
                let records = codec::split_journal_value(&value).unwrap();
                (key, records.into_iter().map(<[u8]>::to_vec).collect())
            })
            .collect();
        let expected: Vec<(Vec<u8>, Vec<Vec<u8>>)> = vec![
            (
                codec::journal_key(&a, 3),
                vec![b"a3".to_vec(), b"a4".to_vec()],
            ),
            (
                codec::journal_key(&b, 7),
                vec![b"b7".to_vec(), b"b8".to_vec()],
            ),
            (codec::journal_key(&b, 10), vec![b"b10".to_vec()]),
        ];
        assert_eq!(stored, expected);
        journal.close();
    }

    /// Every key and value of the journal column family once `writes` are written
    /// as one group commit.
    fn journal_after_one_batch(
        journal: &Journal,
        writes: &[JournalWrite],
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let db = journal.db().unwrap();
        db.write(batch_of(writes, cf(&db, CF_JOURNAL), cf(&db, CF_SNAPSHOTS)))
            .unwrap();
        db.iterator_cf(cf(&db, CF_JOURNAL), IteratorMode::Start)
            .map(|item| {
                let (key, value) = item.unwrap();
                (key.to_vec(), value.to_vec())
            })
            .collect()
    }

    /// Consecutive records that would take a run past `RUN_BYTES_MAX` start another.
    #[test]
    fn a_run_is_closed_before_it_outgrows_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(dir.path(), JournalOptions::default(), resync, None).unwrap();
        let sku = SkuId::parse("big").unwrap();
        let big = RUN_BYTES_MAX / 2 + 1;
        let writes: Vec<JournalWrite> = (1..=3)
            .map(|seq| JournalWrite {
                sku: sku.clone(),
                epoch: None,
                op: JournalOp::Append {
                    seq,
                    record: vec![b'x'; big],
                },
                done: Box::new(|_| {}),
            })
            .collect();
        let keys: Vec<Vec<u8>> = journal_after_one_batch(&journal, &writes)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let expected: Vec<Vec<u8>> = (1..=3).map(|seq| codec::journal_key(&sku, seq)).collect();
        assert_eq!(keys, expected);
        journal.close();
    }

    /// Every record's key, in order, read back by a freshly opened journal.
    fn reopened_journal_keys(path: &Path) -> Vec<Vec<u8>> {
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(path, JournalOptions::default(), resync, None).unwrap();
        let db = journal.db().unwrap();
        let keys = db
            .iterator_cf(cf(&db, CF_JOURNAL), IteratorMode::Start)
            .map(|item| item.unwrap().0.to_vec())
            .collect();
        journal.close();
        keys
    }

    #[test]
    fn records_in_a_reused_wal_file_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (resync, _) = tokio::sync::mpsc::unbounded_channel();
        let journal = Journal::open(dir.path(), JournalOptions::default(), resync, None).unwrap();
        // Two flushes retire the first WAL file and then write over it.
        put_records(&journal, 1, 200);
        flush_all(&journal);
        put_records(&journal, 200, 300);
        flush_all(&journal);
        // These live only in the reused file, above the old records it still holds.
        put_records(&journal, 300, 310);
        let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
        assert!(
            log.contains("from recycle list"),
            "the last records were not written over an old WAL file"
        );
        // Closing does not flush a memtable whose writes are in the WAL, so the
        // reopened journal has these from the reused file alone, as after a crash.
        journal.close();
        let sku = SkuId::parse("recycle").unwrap();
        let expected: Vec<Vec<u8>> = (1..310).map(|seq| codec::journal_key(&sku, seq)).collect();
        assert_eq!(reopened_journal_keys(dir.path()), expected);
    }

    #[test]
    fn an_idle_journal_syncs_at_once() {
        assert_eq!(Linger::new(BUDGET, 0, 4096).next_step(1), None);
        assert_eq!(Linger::new(BUDGET, 2, 4096).next_step(1), None);
        assert_eq!(Linger::new(Duration::ZERO, 40, 4096).next_step(1), None);
    }

    #[test]
    fn a_small_batch_after_a_large_one_waits_while_requests_keep_coming() {
        let mut linger = Linger::new(BUDGET, 40, 4096);
        assert_eq!(linger.next_step(3), Some(LINGER_STEP));
        assert_eq!(linger.next_step(9), Some(LINGER_STEP));
        // Nothing came during the last step: sync now.
        assert_eq!(linger.next_step(9), None);
    }

    #[test]
    fn the_wait_ends_at_half_the_previous_batch_the_cap_or_the_budget() {
        let mut linger = Linger::new(BUDGET, 40, 4096);
        assert!(linger.next_step(3).is_some());
        assert_eq!(linger.next_step(20), None);

        let mut capped = Linger::new(BUDGET, 40, 8);
        assert!(capped.next_step(3).is_some());
        assert_eq!(capped.next_step(8), None);

        let mut spent = Linger::new(Duration::from_micros(120), 1000, 4096);
        let steps: Vec<_> = (1..10).map_while(|n| spent.next_step(n)).collect();
        assert_eq!(
            steps,
            [LINGER_STEP, LINGER_STEP, Duration::from_micros(20)],
            "the budget is never overrun"
        );
    }
}

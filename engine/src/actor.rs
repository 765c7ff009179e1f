//! The SKU actor: owns one [`Sku`], applies commands to it one at a time, journals
//! the resulting events and lets the journal writer answer the caller once they are
//! durable. The actor does not wait for the disk: it goes on with the next command
//! while earlier writes are in flight, which is safe because every answer leaves from
//! the writer after its fsync, and the writer keeps each SKU's records in order.
//!
//! An answer that reveals state without writing anything (an idempotent retry, an
//! order lookup, a revealed card) waits behind a journal barrier whenever some of
//! this SKU's events are still in flight, so nobody is told of a change that a crash
//! could still undo. Refusals leave at once: they promise nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use crate::clock::{Clock, Timestamp};
use crate::codec;
use crate::error::EngineError;
use crate::ids::{OrderId, PaymentRef, SkuId};
use crate::journal::{Journal, JournalOp, JournalWrite};
use crate::keyed_refusals::KeyedRefusals;
use crate::limits::{
    ENDED_ORDERS_KEPT_MS, EXPIRE_BATCH_ORDERS_MAX, JOURNAL_QUEUE_DEPTH_MAX, PRUNE_BATCH_ORDERS_MAX,
    SNAPSHOT_DEFER_FACTOR_MAX,
};
use crate::reserved_keys::ReservedKeys;
use crate::sku::{
    Command, Event, RefusalReason, RefusedPayment, Reply, Sku, SkuDef, SkuError, SkuStatus,
    SkuView, StockCounts,
};

/// What a SKU actor publishes for readers that must not queue behind buyers: the
/// HTTP edge serves `GET /v1/skus/{sku}` and sheds sold-out orders from this. The
/// stock counts and the definition are published once the change is durable, like
/// any other answer; only the next expiry (for the ticker, not for readers) is
/// published as soon as it moves.
pub(crate) struct SkuShared {
    pub id: SkuId,
    /// `id.route_hash()`, which every new order id carries.
    pub route_hash: u32,
    pub def: ArcSwap<SkuDef>,
    available: AtomicU64,
    reserved: AtomicU64,
    sold: AtomicU64,
    imported: AtomicU64,
    /// Milliseconds of the next reservation deadline; `u64::MAX` when none.
    pub next_expiry_ms: AtomicU64,
    /// An `ExpireDue` is queued; keeps the ticker from piling them up.
    pub expiry_queued: AtomicBool,
    /// Commands sent to the actor and not yet taken; bounded by the caller.
    pub mailbox_depth: AtomicUsize,
    /// The sequence number whose state the counts and definition show.
    published_seq: AtomicU64,
    /// A snapshot is due and waits for a quiet moment (see [`snapshot_timing`]); the
    /// expiry ticker asks for it once the node is quiet.
    pub snapshot_wanted: AtomicBool,
    /// `published_seq` when the ticker last looked, so it can count the records of
    /// each tick; only the ticker writes it.
    pub seq_at_last_tick: AtomicU64,
    /// The idempotency keys of the SKU's orders, for the edge to tell a keyed order it
    /// can refuse from one only the actor can answer.
    pub reserved_keys: ReservedKeys,
    /// Refusals of keyed reservations, answered again to retries; written by the
    /// actor and by the edge.
    pub keyed_refusals: KeyedRefusals,
    /// The actor could not reload after a failed write and refuses every command.
    pub poisoned: AtomicBool,
}

/// The state a journal record leaves a SKU in, as readers see it.
struct Published {
    counts: StockCounts,
    def: Option<SkuDef>,
}

impl SkuShared {
    fn new(sku: &Sku) -> Self {
        let shared = SkuShared {
            id: sku.id().clone(),
            route_hash: sku.id().route_hash(),
            def: ArcSwap::from_pointee(sku.def().clone()),
            available: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            sold: AtomicU64::new(0),
            imported: AtomicU64::new(0),
            next_expiry_ms: AtomicU64::new(u64::MAX),
            expiry_queued: AtomicBool::new(false),
            mailbox_depth: AtomicUsize::new(0),
            published_seq: AtomicU64::new(0),
            snapshot_wanted: AtomicBool::new(false),
            seq_at_last_tick: AtomicU64::new(0),
            reserved_keys: ReservedKeys::new(sku.idempotency_keys()),
            keyed_refusals: KeyedRefusals::default(),
            poisoned: AtomicBool::new(false),
        };
        shared.publish_next_expiry(sku);
        shared.store(&Published {
            counts: sku.counts(),
            def: None,
        });
        shared
    }

    fn publish_next_expiry(&self, sku: &Sku) {
        let next = sku.next_expiry().map_or(u64::MAX, |at| at.as_millis());
        self.next_expiry_ms.store(next, Ordering::Relaxed);
    }

    /// Publishes the state left by record `seq`, now durable. Completions come in
    /// journal order, one at a time; the check keeps a reload's state from being
    /// overwritten by an older record's.
    fn publish_durable(&self, seq: u64, published: &Published) {
        if seq > self.published_seq.load(Ordering::Relaxed) {
            self.published_seq.store(seq, Ordering::Relaxed);
            self.store(published);
        }
    }

    /// The sequence number of the last record readers can see.
    pub(crate) fn published_seq(&self) -> u64 {
        self.published_seq.load(Ordering::Relaxed)
    }

    /// Publishes a state reloaded from disk at `seq`.
    fn publish_reloaded(&self, seq: u64, sku: &Sku) {
        self.published_seq.store(seq, Ordering::Relaxed);
        self.publish_next_expiry(sku);
        self.store(&Published {
            counts: sku.counts(),
            def: Some(sku.def().clone()),
        });
    }

    fn store(&self, published: &Published) {
        let counts = &published.counts;
        // Release: an edge that reads the stock the actor left (sold out) also sees the
        // keys the actor added to `reserved_keys` before it.
        self.available.store(counts.available, Ordering::Release);
        self.reserved.store(counts.reserved, Ordering::Relaxed);
        self.sold.store(counts.sold, Ordering::Relaxed);
        self.imported.store(counts.imported, Ordering::Relaxed);
        if let Some(def) = &published.def {
            self.def.store(Arc::new(def.clone()));
        }
    }

    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Acquire)
    }

    /// The status as last published, without copying the definition: asked for
    /// every order the edge sheds.
    pub fn status(&self, now: Timestamp) -> SkuStatus {
        SkuStatus::derive(&self.def.load(), self.available(), now)
    }

    pub fn view(&self, now: Timestamp) -> SkuView {
        let def = SkuDef::clone(&self.def.load());
        let counts = StockCounts {
            available: self.available.load(Ordering::Relaxed),
            reserved: self.reserved.load(Ordering::Relaxed),
            sold: self.sold.load(Ordering::Relaxed),
            imported: self.imported.load(Ordering::Relaxed),
        };
        let status = SkuStatus::derive(&def, counts.available, now);
        SkuView {
            sku: self.id.clone(),
            def,
            counts,
            status,
        }
    }
}

/// Runs a read against the state; returns how to deliver the answer once every
/// event it may reflect is durable (or why it cannot be delivered).
pub(crate) type Read =
    Box<dyn FnOnce(&Sku, u64) -> Box<dyn FnOnce(Result<(), EngineError>) + Send> + Send>;

pub(crate) type CommandReply = oneshot::Sender<Result<Reply, EngineError>>;

/// Every reason a SKU actor wakes up.
pub(crate) enum SkuMsg {
    Command {
        command: Command,
        reply: CommandReply,
    },
    Read(Read),
    /// The reservation ticker saw a deadline pass.
    ExpireDue,
    /// Forget orders that ended long enough ago (the ticker sends it now and then).
    PruneEnded,
    /// A journal write of `failed_epoch` failed: reload from disk.
    Resync {
        failed_epoch: u64,
    },
    /// Write a snapshot now (shutdown), answering once it is durable.
    Snapshot(oneshot::Sender<Result<(), EngineError>>),
    /// The node went quiet while a snapshot was waiting: write it, if still due.
    SnapshotIfDue,
}

pub(crate) struct SkuActor;

pub(crate) struct SkuActorArgs {
    pub sku: Sku,
    pub seq: u64,
    pub records_since_snapshot: u64,
    pub snapshot_records_min: u64,
    pub shared: Arc<SkuShared>,
    pub journal: Arc<Journal>,
    pub clock: Arc<dyn Clock>,
}

pub(crate) struct SkuActorState {
    sku: Sku,
    /// Sequence number of the last record submitted to the journal.
    seq: u64,
    /// Sequence number of the last record known durable; written by the journal
    /// writer's completions.
    durable_seq: Arc<AtomicU64>,
    epoch: u64,
    records_since_snapshot: u64,
    snapshot_records_min: u64,
    /// Set when reloading from disk failed: every command is refused from then on.
    poisoned: bool,
    /// The SKU time the clock was last found far behind (and followed back from),
    /// so that each such step is counted and logged once.
    clock_followed_back_from: Option<Timestamp>,
    shared: Arc<SkuShared>,
    journal: Arc<Journal>,
    clock: Arc<dyn Clock>,
}

impl SkuShared {
    pub(crate) fn for_sku(sku: &Sku) -> Arc<Self> {
        Arc::new(SkuShared::new(sku))
    }
}

impl Actor for SkuActor {
    type Msg = SkuMsg;
    type State = SkuActorState;
    type Arguments = SkuActorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SkuMsg>,
        args: SkuActorArgs,
    ) -> Result<SkuActorState, ActorProcessingErr> {
        Ok(SkuActorState {
            sku: args.sku,
            seq: args.seq,
            durable_seq: Arc::new(AtomicU64::new(args.seq)),
            epoch: 0,
            records_since_snapshot: args.records_since_snapshot,
            snapshot_records_min: args.snapshot_records_min,
            poisoned: false,
            clock_followed_back_from: None,
            shared: args.shared,
            journal: args.journal,
            clock: args.clock,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SkuMsg>,
        message: SkuMsg,
        state: &mut SkuActorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SkuMsg::Command { command, reply } => {
                state.shared.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
                let is_define = matches!(command, Command::Define(_));
                state.run_command(command, Some(reply), is_define);
            }
            SkuMsg::Read(read) => {
                state.shared.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
                let deliver = read(&state.sku, state.seq);
                if state.poisoned {
                    // Memory may hold changes the disk refused (the reload after a
                    // failed write failed too): answer nothing from it, a card least.
                    deliver(Err(EngineError::SkuUnavailable));
                } else {
                    state.after_durable(deliver);
                }
            }
            SkuMsg::ExpireDue => {
                state.shared.expiry_queued.store(false, Ordering::Relaxed);
                let expired = state.run_command(Command::ExpireDue, None, false);
                let now = state.clock.now();
                // Only after a full batch: a pass that expired fewer was refused
                // (journal full, actor poisoned) or took all that was due, and going on
                // would spin; the ticker comes back.
                if expired >= EXPIRE_BATCH_ORDERS_MAX
                    && state.sku.next_expiry().is_some_and(|due| due <= now)
                    && !state.shared.expiry_queued.swap(true, Ordering::Relaxed)
                {
                    // More were due than one batch takes; go on without waiting a tick.
                    let _ = myself.send_message(SkuMsg::ExpireDue);
                }
            }
            SkuMsg::PruneEnded => {
                let command = Command::PruneEnded {
                    kept_for_ms: ENDED_ORDERS_KEPT_MS,
                };
                if state.run_command(command, None, false) >= PRUNE_BATCH_ORDERS_MAX {
                    // More were due than one batch takes; go on without waiting.
                    let _ = myself.send_message(SkuMsg::PruneEnded);
                }
            }
            SkuMsg::Resync { failed_epoch } => state.resync(failed_epoch),
            SkuMsg::SnapshotIfDue => {
                if !state.poisoned && state.snapshot_timing() != SnapshotTiming::NotYet {
                    state.write_snapshot(SnapshotTrigger::Quiet, None);
                }
            }
            SkuMsg::Snapshot(reply) => {
                if state.poisoned {
                    let _ = reply.send(Err(EngineError::SkuUnavailable));
                } else if state.records_since_snapshot == 0 {
                    // The last snapshot (or creation) already covers everything.
                    state.after_durable(Box::new(move |durable| {
                        let _ = reply.send(durable);
                    }));
                } else {
                    state.write_snapshot(SnapshotTrigger::Requested, Some(reply));
                }
            }
        }
        Ok(())
    }
}

/// Why a snapshot is written, as `keydrop_snapshots_total{trigger}` counts it.
#[derive(Debug, Clone, Copy)]
enum SnapshotTrigger {
    /// Due, and the node went quiet.
    Quiet,
    /// Waited for a quiet moment as long as it may.
    Overdue,
    /// Asked for (at shutdown).
    Requested,
}

impl SnapshotTrigger {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotTrigger::Quiet => "quiet",
            SnapshotTrigger::Overdue => "overdue",
            SnapshotTrigger::Requested => "requested",
        }
    }
}

/// When a SKU should write its next snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotTiming {
    NotYet,
    /// Due: once the node is quiet, so a drop's buyers do not wait behind it.
    WhenQuiet,
    /// Overdue: now, however busy the SKU is, so replay at recovery stays bounded.
    Now,
}

/// A snapshot is due once the records since the last one outweigh the state itself
/// (`size`: cards imported and orders held) and number at least `records_min`, so
/// the cost of snapshots stays proportional to the work done; it waits for a quiet
/// moment up to [`SNAPSHOT_DEFER_FACTOR_MAX`] times that.
pub(crate) fn snapshot_timing(
    records_since_snapshot: u64,
    size: u64,
    records_min: u64,
) -> SnapshotTiming {
    let due_at = records_min.max(size);
    if records_since_snapshot >= due_at.saturating_mul(SNAPSHOT_DEFER_FACTOR_MAX) {
        SnapshotTiming::Now
    } else if records_since_snapshot >= due_at {
        SnapshotTiming::WhenQuiet
    } else {
        SnapshotTiming::NotYet
    }
}

/// A payment refused and recorded on its order: money the operator has to refund
/// (`keydrop order late`). Late (the order expired or was cancelled), of the wrong
/// amount, or a second payment of a paid order.
struct RecordedRefusal {
    order_id: OrderId,
    payment_ref: PaymentRef,
    amount_cents: u64,
    reason: RefusalReason,
}

impl RecordedRefusal {
    fn recorded_by(event: &Event) -> Option<RecordedRefusal> {
        match event {
            Event::PaymentRefused {
                order_id,
                payment_ref,
                amount_cents,
                reason,
                ..
            } => Some(RecordedRefusal {
                order_id: *order_id,
                payment_ref: payment_ref.clone(),
                amount_cents: *amount_cents,
                reason: *reason,
            }),
            _ => None,
        }
    }

    fn log_recorded(&self, sku: &SkuId) {
        let reason = self.reason.as_str();
        metrics::counter!("keydrop_refused_payments_recorded_total", "reason" => reason)
            .increment(1);
        if matches!(
            self.reason,
            RefusalReason::Expired | RefusalReason::Cancelled
        ) {
            metrics::counter!("keydrop_late_payments_total").increment(1);
        }
        tracing::warn!(
            sku = %sku,
            order = %self.order_id,
            payment_ref = %self.payment_ref,
            amount_cents = self.amount_cents,
            reason,
            "payment refused and recorded for refund"
        );
    }
}

/// A payment refused on an order that already holds the refused payments it keeps,
/// so recorded nowhere but in the log: money the operator must find in the
/// provider's records to refund.
struct UnrecordedRefusal {
    sku: SkuId,
    order_id: OrderId,
    refused: RefusedPayment,
}

impl UnrecordedRefusal {
    fn report(&self) {
        // Each callback, retries included: nothing on the order tells them apart.
        metrics::counter!("keydrop_refused_payments_unrecorded_total").increment(1);
        tracing::error!(
            sku = %self.sku,
            order = %self.order_id,
            payment_ref = %self.refused.payment_ref,
            amount_cents = self.refused.amount_cents,
            reason = self.refused.reason.as_str(),
            "payment refused and not recorded: the order holds the most refused payments it keeps; refund it from the provider's records"
        );
    }
}

impl SkuActorState {
    /// Applies `command` and journals its events; returns how many orders it expired
    /// or pruned.
    fn run_command(
        &mut self,
        command: Command,
        reply: Option<CommandReply>,
        is_define: bool,
    ) -> usize {
        if self.poisoned {
            if let Some(reply) = reply {
                let _ = reply.send(Err(EngineError::SkuUnavailable));
            }
            return 0;
        }
        // Refuse before touching state: once applied, a command must reach the disk.
        if self.journal.queue_depth() >= JOURNAL_QUEUE_DEPTH_MAX {
            metrics::counter!("keydrop_engine_overloaded_total", "queue" => "journal").increment(1);
            if let Some(reply) = reply {
                let _ = reply.send(Err(EngineError::Overloaded));
            }
            return 0;
        }
        let refusal_waits = RefusalWaits::for_command(&command);
        let now = self.clock.now();
        if self.sku.time_at(now) < self.sku.last_now()
            && self.clock_followed_back_from != Some(self.sku.last_now())
        {
            // Followed, not held: the clock had run far ahead and was corrected.
            // Reservations made meanwhile still fall due by the clock they were made at.
            // Told once per step: the SKU's time moves only with its next record.
            self.clock_followed_back_from = Some(self.sku.last_now());
            metrics::counter!("keydrop_clock_steps_back_followed_total").increment(1);
            tracing::warn!(
                sku = %self.sku.id(),
                clock_ms = now.0,
                sku_time_ms = self.sku.last_now().0,
                "the wall clock is far behind this SKU's latest time; following it back"
            );
        }
        // A keyed reservation the SKU has no order for may have been refused before,
        // here or at the edge. Decided under the refusals' lock, held until the
        // reservation's key is in `reserved_keys`: the edge answers the same key under
        // it, so one of the two always finds what the other decided.
        let keyed = match &command {
            Command::Reserve(request) => request
                .idempotency
                .as_ref()
                .filter(|(key, _)| !self.sku.knows_idempotency_key(key))
                .cloned(),
            _ => None,
        };
        let mut refusals = keyed.is_some().then(|| self.shared.keyed_refusals.lock());
        if let (Some(held), Some((key, fingerprint))) = (refusals.as_mut(), &keyed) {
            if let Some(error) = held.earlier(key, fingerprint, now).answer() {
                drop(refusals);
                metrics::counter!("keydrop_idempotent_refusals_replayed_total").increment(1);
                if let Some(reply) = reply {
                    let _ = reply.send(Err(EngineError::Sku(error)));
                }
                return 0;
            }
        }
        let mut decision = self.sku.handle(command, now);
        let unrecorded = decision
            .unrecorded_refusal
            .take()
            .map(|(order_id, refused)| UnrecordedRefusal {
                sku: self.sku.id().clone(),
                order_id,
                refused,
            });
        if let (Some(held), Some((key, fingerprint)), Err(refusal)) =
            (refusals.as_mut(), keyed, &decision.reply)
        {
            held.remember(key, fingerprint, refusal, now);
        }
        // Added as decided, ahead of the stock the edge sheds by, which is published
        // once durable; removed only once durable (below).
        for event in &decision.events {
            if let Event::Reserved {
                idempotency: Some((key, _)),
                ..
            } = event
            {
                self.shared.reserved_keys.add(key);
            }
        }
        drop(refusals);
        let forgotten_keys = std::mem::take(&mut decision.forgotten_keys);
        self.shared.publish_next_expiry(&self.sku);
        if decision.events.is_empty() {
            // Ahead of the answer, so whoever got the answer finds the report made.
            self.report_when_durable(unrecorded);
            match (decision.reply, reply) {
                (Err(refusal), Some(reply)) if refusal_waits.applies_to(&refusal) => {
                    self.after_durable(Box::new(move |durable| {
                        let _ = reply.send(durable.and(Err(EngineError::Sku(refusal))));
                    }));
                }
                (Err(refusal), Some(reply)) => {
                    let _ = reply.send(Err(EngineError::Sku(refusal)));
                }
                (Ok(answer), Some(reply)) => self.after_durable(Box::new(move |durable| {
                    let _ = reply.send(durable.map(|()| answer));
                })),
                (_, None) => {}
            }
            return 0;
        }
        let mut ended = 0;
        for event in &decision.events {
            match event {
                Event::Expired { order_ids, .. } => {
                    ended += order_ids.len();
                    metrics::counter!("keydrop_reservations_expired_total")
                        .increment(order_ids.len() as u64);
                }
                Event::Pruned { order_ids, .. } => {
                    ended += order_ids.len();
                    metrics::counter!("keydrop_orders_pruned_total")
                        .increment(order_ids.len() as u64);
                    tracing::debug!(sku = %self.sku.id(), orders = order_ids.len(), "ended orders pruned");
                }
                _ => {}
            }
        }
        // Counted once durable, and once per recorded refusal: a provider retrying
        // the same refused callback gets the refusal again but records nothing new.
        let refunds_owed: Vec<RecordedRefusal> = decision
            .events
            .iter()
            .filter_map(RecordedRefusal::recorded_by)
            .collect();
        self.seq += 1;
        self.records_since_snapshot += 1;
        let seq = self.seq;
        let durable_seq = Arc::clone(&self.durable_seq);
        let epoch = self.epoch;
        let record = codec::encode_events(&decision.events);
        let answer = decision.reply;
        // Only for the log line of a refund owed: no copy for the other records.
        let sku = (!refunds_owed.is_empty()).then(|| self.sku.id().clone());
        let shared = Arc::clone(&self.shared);
        let published = Published {
            counts: self.sku.counts(),
            def: is_define.then(|| self.sku.def().clone()),
        };
        self.journal.submit(JournalWrite {
            sku: self.sku.id().clone(),
            epoch: Some(self.epoch),
            op: JournalOp::Append { seq, record },
            done: Box::new(move |written| {
                let outcome = match written {
                    Ok(()) => {
                        durable_seq.fetch_max(seq, Ordering::Release);
                        shared.publish_durable(seq, &published);
                        if let Some(sku) = &sku {
                            for refund in &refunds_owed {
                                refund.log_recorded(sku);
                            }
                        }
                        if let Some(unrecorded) = &unrecorded {
                            unrecorded.report();
                        }
                        for key in &forgotten_keys {
                            shared.reserved_keys.remove(key, epoch);
                        }
                        answer.map_err(EngineError::Sku)
                    }
                    Err(error) => Err(EngineError::from_journal(error)),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
            }),
        });
        self.maybe_snapshot();
        ended
    }

    /// Reports a refusal the order could not record once the state it rests on is
    /// durable, as its answer is: after a failed write the SKU reloads, the order may
    /// have room again, and the provider's retry is recorded instead.
    fn report_when_durable(&self, unrecorded: Option<UnrecordedRefusal>) {
        if let Some(unrecorded) = unrecorded {
            self.after_durable(Box::new(move |durable| {
                if durable.is_ok() {
                    unrecorded.report();
                }
            }));
        }
    }

    /// Delivers now if everything applied is durable, else after a journal barrier.
    fn after_durable(&self, deliver: Box<dyn FnOnce(Result<(), EngineError>) + Send>) {
        if self.durable_seq.load(Ordering::Acquire) >= self.seq {
            deliver(Ok(()));
            return;
        }
        self.journal.submit(JournalWrite {
            sku: self.sku.id().clone(),
            epoch: Some(self.epoch),
            op: JournalOp::Barrier,
            done: Box::new(move |written| deliver(written.map_err(EngineError::from_journal))),
        });
    }

    fn snapshot_timing(&self) -> SnapshotTiming {
        let size = self.sku.counts().imported + self.sku.order_count() as u64;
        snapshot_timing(self.records_since_snapshot, size, self.snapshot_records_min)
    }

    /// Snapshots when [`snapshot_timing`] says now; when it says once quiet, leaves
    /// the word for the expiry ticker.
    fn maybe_snapshot(&mut self) {
        match self.snapshot_timing() {
            SnapshotTiming::NotYet => {}
            SnapshotTiming::WhenQuiet => {
                if !self.shared.snapshot_wanted.load(Ordering::Relaxed) {
                    self.shared.snapshot_wanted.store(true, Ordering::Relaxed);
                }
            }
            SnapshotTiming::Now => self.write_snapshot(SnapshotTrigger::Overdue, None),
        }
    }

    fn write_snapshot(
        &mut self,
        trigger: SnapshotTrigger,
        reply: Option<oneshot::Sender<Result<(), EngineError>>>,
    ) {
        let seq = self.seq;
        let records = self.records_since_snapshot;
        let record = codec::encode_snapshot(seq, self.sku.snapshot_ref());
        self.records_since_snapshot = 0;
        self.shared.snapshot_wanted.store(false, Ordering::Relaxed);
        let sku = self.sku.id().clone();
        metrics::counter!("keydrop_snapshots_total", "trigger" => trigger.as_str()).increment(1);
        tracing::info!(
            sku = %sku,
            seq,
            records,
            bytes = record.len(),
            trigger = trigger.as_str(),
            "writing snapshot"
        );
        self.journal.submit(JournalWrite {
            sku: sku.clone(),
            epoch: Some(self.epoch),
            op: JournalOp::Snapshot { seq, record },
            done: Box::new(move |written| {
                if let Err(error) = &written {
                    tracing::warn!(sku = %sku, %error, "snapshot not written; the journal still holds every record");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(written.map_err(EngineError::from_journal));
                }
            }),
        });
    }

    fn resync(&mut self, failed_epoch: u64) {
        if failed_epoch < self.epoch {
            return;
        }
        self.epoch = failed_epoch + 1;
        let id = self.sku.id().clone();
        match self.journal.load_sku(&id) {
            Ok(Some(recovered)) => {
                tracing::warn!(sku = %id, seq = recovered.seq, "reloaded SKU from disk after a failed journal write");
                self.sku = recovered.sku;
                self.seq = recovered.seq;
                self.durable_seq.store(recovered.seq, Ordering::Release);
                self.records_since_snapshot = recovered.records_replayed;
                // A refusal remembered since the last durable record may rest on
                // state the failed batch took with it (a card reserved, an order
                // counted against a limit): decided afresh from the reloaded SKU.
                // Forgotten before the reloaded stock is published, so the edge
                // answers nothing from them once it sees that stock.
                self.shared.keyed_refusals.clear();
                self.shared
                    .reserved_keys
                    .rebuild(self.sku.idempotency_keys(), self.epoch);
                self.shared.publish_reloaded(recovered.seq, &self.sku);
            }
            Ok(None) | Err(_) => {
                tracing::error!(sku = %id, "cannot reload SKU from disk; refusing its commands until restart");
                // Every order of the SKU is answered 503 from now on, at debug level:
                // the gauge is what an alert can see.
                metrics::gauge!("keydrop_sku_unavailable", "sku" => id.to_string()).set(1.0);
                self.poisoned = true;
                // The edge sends keyed orders to the actor from now on, to be refused
                // as unavailable, and answers none from refusals that rest on memory
                // the disk did not take.
                self.shared.poisoned.store(true, Ordering::Release);
                self.shared.keyed_refusals.clear();
            }
        }
    }
}

/// Which refusals of a command are answered only once the journal holds everything
/// before them: those that reflect a record perhaps still on its way to disk, which
/// a crash before the fsync would make false. A payment refused for what an earlier
/// callback left on the order (the provider would hold a final answer whose refund
/// record a crash then loses); a cancel refused because the order is paid or ended;
/// a key refused as reused, when its reservation may not be durable yet.
#[derive(Debug, Clone, Copy)]
enum RefusalWaits {
    All,
    KeyReusedOnly,
}

impl RefusalWaits {
    fn for_command(command: &Command) -> Self {
        match command {
            Command::ConfirmPayment { .. } | Command::Cancel { .. } => RefusalWaits::All,
            _ => RefusalWaits::KeyReusedOnly,
        }
    }

    fn applies_to(self, refusal: &SkuError) -> bool {
        matches!(self, RefusalWaits::All) || matches!(refusal, SkuError::IdempotencyKeyReused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_due_at_the_larger_of_the_minimum_and_the_size_and_overdue_at_four_times() {
        use SnapshotTiming::*;
        // The minimum rules a small SKU.
        assert_eq!(snapshot_timing(19_999, 10, 20_000), NotYet);
        assert_eq!(snapshot_timing(20_000, 10, 20_000), WhenQuiet);
        assert_eq!(snapshot_timing(79_999, 10, 20_000), WhenQuiet);
        assert_eq!(snapshot_timing(80_000, 10, 20_000), Now);
        // The size rules a large one.
        assert_eq!(snapshot_timing(199_999, 200_000, 20_000), NotYet);
        assert_eq!(snapshot_timing(200_000, 200_000, 20_000), WhenQuiet);
        assert_eq!(snapshot_timing(800_000, 200_000, 20_000), Now);
        // No overflow at the edge.
        assert_eq!(snapshot_timing(u64::MAX, u64::MAX, 1), Now);
        assert_eq!(snapshot_timing(0, 0, 1), NotYet);
    }
}

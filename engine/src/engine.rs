//! [`Engine`]: the handle the rest of keydrop holds. It owns the registry of SKU
//! actors, routes each call to the right one, seals and opens card secrets around
//! them, and runs the background work (reservation expiry, resync after a failed
//! write, key rotation).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;

use crate::actor::{SkuActor, SkuActorArgs, SkuMsg, SkuShared};
use crate::clock::{Clock, SystemClock};
use crate::codec;
use crate::error::EngineError;
use crate::ids::{
    CardSerial, DeviceId, IdempotencyKey, OrderId, PaymentRef, RequestFingerprint, SkuId, UserId,
};
use crate::journal::{Journal, JournalOp, JournalOptions, RecoveredSku, RecoveryReport};
use crate::limits::{
    ACTOR_MAILBOX_DEPTH_MAX, BUNDLE_SEQ_MAX, EVENTS_BETWEEN_SNAPSHOTS_MIN, IMPORT_BATCH_CARDS_MAX,
    JOURNAL_QUEUE_DEPTH_MAX, QUIET_RECORDS_PER_SEC_MAX, RESERVATION_TTL_MS_MAX,
};
use crate::sku::{
    Command, ImportOutcome, NewCard, OrderStatus, OrderView, Reply, ReserveRequest, Sku, SkuDef,
    SkuError, SkuStatus, SkuView,
};
use crate::vault::{CardSecret, KeyRing, SealedSecret};

/// Cards re-sealed per actor round trip during key rotation.
const RESEAL_CHUNK_CARDS_MAX: usize = 1000;
/// How long key rotation waits before offering a chunk again to a SKU whose mailbox
/// was full.
const RESEAL_RETRY_WAIT: Duration = Duration::from_millis(50);

pub struct EngineConfig {
    /// The RocksDB folder. Nothing else lives in it; keys in particular do not.
    pub db_path: PathBuf,
    pub keys: Arc<KeyRing>,
    pub clock: Arc<dyn Clock>,
    /// How often the expiry ticker looks for due reservations; keeps expiry within
    /// this much of each deadline.
    pub expiry_interval: Duration,
    /// How often every SKU is asked to forget the orders that ended more than
    /// `ENDED_ORDERS_KEPT_MS` ago.
    pub prune_interval: Duration,
    /// Journal records of a SKU after its last snapshot before the next one is due
    /// (or the SKU's size, if larger; see `actor::snapshot_timing`).
    pub snapshot_records_min: u64,
    pub journal: JournalOptions,
}

impl EngineConfig {
    pub fn new(db_path: impl Into<PathBuf>, keys: KeyRing) -> Self {
        EngineConfig {
            db_path: db_path.into(),
            keys: Arc::new(keys),
            clock: Arc::new(SystemClock),
            expiry_interval: Duration::from_millis(200),
            prune_interval: Duration::from_secs(60),
            snapshot_records_min: EVENTS_BETWEEN_SNAPSHOTS_MIN,
            journal: JournalOptions::default(),
        }
    }
}

/// A reservation request, already parsed at the edge.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub user: UserId,
    pub device: Option<DeviceId>,
    pub idempotency: Option<(IdempotencyKey, RequestFingerprint)>,
}

/// An order and, once it is paid, its card with the secret opened.
#[derive(Debug, Clone)]
pub struct OrderDetails {
    pub view: OrderView,
    pub card: Option<(CardSerial, CardSecret)>,
}

#[derive(Clone)]
struct SkuHandle {
    shared: Arc<SkuShared>,
    actor: ActorRef<SkuMsg>,
}

struct Inner {
    journal: Arc<Journal>,
    /// Read twice by every order. SKU ids are chosen by the operator, not by
    /// buyers (a lookup of an unknown id inserts nothing), so a fast seeded hash
    /// serves.
    skus: DashMap<SkuId, SkuHandle, foldhash::fast::RandomState>,
    /// Route hash → SKUs with that hash (almost always one), to find an order's SKU.
    routes: DashMap<u32, Vec<SkuId>>,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    /// Serialises creating SKUs (rare, admin-only) so two creations cannot race.
    create_lock: tokio::sync::Mutex<()>,
    recovery: RecoveryReport,
    snapshot_records_min: u64,
    shutting_down: AtomicBool,
}

/// The keydrop engine. Cheap to clone; every clone is the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens the journal, rebuilds every SKU from it and starts their actors.
    pub async fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        let (resync_tx, mut resync_rx) = tokio::sync::mpsc::unbounded_channel();
        let db_path = config.db_path.clone();
        let journal_options = config.journal.clone();
        let runtime = tokio::runtime::Handle::current();
        let (journal, recovered, report) = tokio::task::spawn_blocking(move || {
            let journal = Journal::open(&db_path, journal_options, resync_tx, Some(runtime))?;
            let (recovered, report) = journal.recover()?;
            Ok::<_, EngineError>((journal, recovered, report))
        })
        .await
        .map_err(|e| EngineError::Spawn(e.to_string()))??;
        tracing::info!(
            skus = report.skus,
            snapshots = report.snapshots_loaded,
            records = report.records_replayed,
            cards = report.cards,
            orders = report.orders,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "journal recovered"
        );
        let inner = Arc::new(Inner {
            journal: Arc::new(journal),
            skus: DashMap::default(),
            routes: DashMap::new(),
            keys: config.keys,
            clock: config.clock,
            create_lock: tokio::sync::Mutex::new(()),
            recovery: report,
            snapshot_records_min: config.snapshot_records_min.max(1),
            shutting_down: AtomicBool::new(false),
        });
        let engine = Engine { inner };
        for RecoveredSku {
            sku,
            seq,
            records_replayed,
        } in recovered
        {
            engine.spawn_actor(sku, seq, records_replayed).await?;
        }
        let weak = Arc::downgrade(&engine.inner);
        tokio::spawn(async move {
            while let Some((sku, failed_epoch)) = resync_rx.recv().await {
                let Some(inner) = weak.upgrade() else { break };
                let actor = inner.skus.get(&sku).map(|handle| handle.actor.clone());
                if let Some(actor) = actor {
                    let _ = actor.send_message(SkuMsg::Resync { failed_epoch });
                }
            }
        });
        tokio::spawn(run_expiry_ticker(
            Arc::downgrade(&engine.inner),
            config.expiry_interval,
            config.prune_interval,
        ));
        Ok(engine)
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    pub fn key_ring(&self) -> &KeyRing {
        &self.inner.keys
    }

    pub fn now(&self) -> crate::clock::Timestamp {
        self.inner.clock.now()
    }

    /// What the journal writer has done since open: batches, requests, time spent.
    pub fn journal_stats(&self) -> crate::journal::JournalStats {
        self.inner.journal.stats()
    }

    /// Writes waiting for the journal writer (for metrics and load shedding).
    pub fn journal_queue_depth(&self) -> usize {
        self.inner.journal.queue_depth()
    }

    async fn spawn_actor(
        &self,
        sku: Sku,
        seq: u64,
        records_since_snapshot: u64,
    ) -> Result<SkuHandle, EngineError> {
        let id = sku.id().clone();
        let shared = SkuShared::for_sku(&sku);
        let args = SkuActorArgs {
            sku,
            seq,
            records_since_snapshot,
            snapshot_records_min: self.inner.snapshot_records_min,
            shared: Arc::clone(&shared),
            journal: Arc::clone(&self.inner.journal),
            clock: Arc::clone(&self.inner.clock),
        };
        let (actor, _join) = Actor::spawn(None, SkuActor, args)
            .await
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
        let handle = SkuHandle { shared, actor };
        self.inner
            .routes
            .entry(id.route_hash())
            .or_default()
            .push(id.clone());
        self.inner.skus.insert(id, handle.clone());
        Ok(handle)
    }

    fn handle(&self, sku: &SkuId) -> Result<SkuHandle, EngineError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        self.inner
            .skus
            .get(sku)
            .map(|h| h.clone())
            .ok_or(EngineError::SkuNotFound)
    }

    async fn command(&self, handle: &SkuHandle, command: Command) -> Result<Reply, EngineError> {
        // A full journal queue is refused here too, not only once the actor reaches
        // the command behind everything in its mailbox. (The actor checks again
        // before touching state: the queue may have filled meanwhile.)
        if self.inner.journal.queue_depth() >= JOURNAL_QUEUE_DEPTH_MAX {
            metrics::counter!("keydrop_engine_overloaded_total", "queue" => "journal").increment(1);
            return Err(EngineError::Overloaded);
        }
        self.enter_mailbox(handle)?;
        let (reply, answer) = oneshot::channel();
        if handle
            .actor
            .send_message(SkuMsg::Command { command, reply })
            .is_err()
        {
            handle.shared.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::SkuUnavailable);
        }
        answer.await.unwrap_or(Err(EngineError::SkuUnavailable))
    }

    /// Counts a message into the SKU's mailbox, or refuses it when the mailbox is
    /// full: past the bound, refusing at once beats queueing a buyer behind work that
    /// cannot finish in time. The actor counts each message out as it takes it.
    fn enter_mailbox(&self, handle: &SkuHandle) -> Result<(), EngineError> {
        if handle.shared.mailbox_depth.fetch_add(1, Ordering::Relaxed) >= ACTOR_MAILBOX_DEPTH_MAX {
            handle.shared.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("keydrop_engine_overloaded_total", "queue" => "mailbox").increment(1);
            return Err(EngineError::Overloaded);
        }
        Ok(())
    }

    /// Runs `read` on the SKU's state and returns its answer once every event the
    /// answer may reflect is durable.
    async fn read<T: Send + 'static>(
        &self,
        handle: &SkuHandle,
        read: impl FnOnce(&Sku, u64) -> T + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let boxed: crate::actor::Read = Box::new(move |sku, seq| {
            let value = read(sku, seq);
            Box::new(move |durable: Result<(), EngineError>| {
                let _ = tx.send(durable.map(|()| value));
            })
        });
        // Order lookups are buyers' polls too: they count against the same bound.
        self.enter_mailbox(handle)?;
        if handle.actor.send_message(SkuMsg::Read(boxed)).is_err() {
            handle.shared.mailbox_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::SkuUnavailable);
        }
        rx.await.unwrap_or(Err(EngineError::SkuUnavailable))
    }

    // ---- SKUs ----

    /// Creates a SKU or updates its definition; `true` when it was created.
    pub async fn define_sku(&self, id: SkuId, def: SkuDef) -> Result<(SkuView, bool), EngineError> {
        def.validate()?;
        let _creating = self.inner.create_lock.lock().await;
        if let Ok(handle) = self.handle(&id) {
            return match self.command(&handle, Command::Define(def)).await? {
                Reply::Defined(view) => {
                    // Price, window and limits can change mid-sale: the log says when.
                    tracing::info!(
                        sku = %id,
                        price_cents = view.def.price_cents,
                        per_user_limit = view.def.per_user_limit,
                        "SKU definition updated"
                    );
                    Ok((view, false))
                }
                other => unreachable!("define answered {other:?}"),
            };
        }
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        let now = self.inner.clock.now();
        let (sku, event) = Sku::create(id.clone(), def, now)?;
        let record = codec::encode_events(std::slice::from_ref(&event));
        self.inner
            .journal
            .write_now(id.clone(), JournalOp::Append { seq: 1, record })
            .await
            .map_err(EngineError::from_journal)?;
        let view = sku.view(now);
        // One record (the definition) not covered by any snapshot yet.
        self.spawn_actor(sku, 1, 1).await?;
        tracing::info!(sku = %id, "SKU created");
        Ok((view, true))
    }

    /// The SKU as its actor last published it; no trip to the actor.
    pub fn sku(&self, id: &SkuId) -> Option<SkuView> {
        let shared = Arc::clone(&self.inner.skus.get(id)?.shared);
        Some(shared.view(self.inner.clock.now()))
    }

    /// The SKU's status as last published, for shedding its orders; no trip to the
    /// actor.
    pub fn sku_status(&self, id: &SkuId) -> Option<SkuStatus> {
        let now = self.inner.clock.now();
        self.inner.skus.get(id).map(|h| h.shared.status(now))
    }

    /// Stock in hand as last published, for shedding orders of a sold-out SKU.
    pub fn available_hint(&self, id: &SkuId) -> Option<u64> {
        self.inner.skus.get(id).map(|h| h.shared.available())
    }

    /// Answers, without a trip to the SKU's actor, a keyed order that the published
    /// state refuses with `refusal` (sold out, or outside the sale window): as the
    /// actor would, with what an earlier request with the key was refused (422 if it
    /// was another request), else with `refusal`, held for the key's retries from
    /// now on. `None` when one of the SKU's orders may hold the key (its retry is
    /// owed the original 201, which only the actor has), when the SKU's actor refuses
    /// everything (it could not reload after a failed write) or when the SKU is
    /// unknown: ask the actor.
    pub fn refuse_keyed_order(
        &self,
        id: &SkuId,
        key: &IdempotencyKey,
        fingerprint: &RequestFingerprint,
        refusal: SkuError,
    ) -> Option<SkuError> {
        let shared = Arc::clone(&self.inner.skus.get(id)?.shared);
        // Under the lock the actor decides keyed reservations with (see
        // `KeyedRefusals::lock`): a reservation it made for the key is in
        // `reserved_keys` by then, or it will find this refusal.
        let mut held = shared.keyed_refusals.lock();
        if shared.reserved_keys.may_hold(key) || shared.poisoned.load(Ordering::Acquire) {
            return None;
        }
        let (answer, replayed) = held.refuse(key, fingerprint, refusal, self.inner.clock.now());
        drop(held);
        if replayed {
            metrics::counter!("keydrop_idempotent_refusals_replayed_total").increment(1);
        }
        Some(answer)
    }

    pub fn skus(&self) -> Vec<SkuView> {
        let now = self.inner.clock.now();
        let mut views: Vec<SkuView> = self.inner.skus.iter().map(|h| h.shared.view(now)).collect();
        views.sort_by(|a, b| a.sku.cmp(&b.sku));
        views
    }

    /// Seals and imports cards. Re-importing a known serial counts as a duplicate, so
    /// a failed import can simply be sent again.
    pub async fn import_cards(
        &self,
        id: &SkuId,
        cards: Vec<(CardSerial, CardSecret)>,
    ) -> Result<ImportOutcome, EngineError> {
        let handle = self.handle(id)?;
        let mut total = ImportOutcome::default();
        let mut cards = cards.into_iter().peekable();
        while cards.peek().is_some() {
            let chunk: Vec<(CardSerial, CardSecret)> =
                cards.by_ref().take(IMPORT_BATCH_CARDS_MAX).collect();
            let keys = Arc::clone(&self.inner.keys);
            let sku = id.clone();
            // Sealing is CPU work; keep it off the async workers and out of the actor.
            let sealed = tokio::task::spawn_blocking(move || {
                chunk
                    .into_iter()
                    .map(|(serial, secret)| {
                        let sealed = keys.seal(&sku, &serial, &secret);
                        NewCard { serial, sealed }
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
            match self.command(&handle, Command::ImportCards(sealed)).await? {
                Reply::Imported(outcome) => {
                    total.imported += outcome.imported;
                    total.duplicates += outcome.duplicates;
                }
                other => unreachable!("import answered {other:?}"),
            }
        }
        Ok(total)
    }

    // ---- orders ----

    /// Reserves one card for a buyer; answers once the reservation is durable.
    pub async fn reserve(
        &self,
        id: &SkuId,
        request: Reservation,
    ) -> Result<OrderView, EngineError> {
        let handle = self.handle(id)?;
        let command = Command::Reserve(ReserveRequest {
            order_id: OrderId::generate_with_route_hash(handle.shared.route_hash),
            user: request.user,
            device: request.device,
            idempotency: request.idempotency,
        });
        match self.command(&handle, command).await? {
            Reply::Reserved(view) => Ok(view),
            other => unreachable!("reserve answered {other:?}"),
        }
    }

    /// Finds the SKU that owns an order from the route hash the order id carries.
    async fn order_owner(&self, order_id: &OrderId) -> Result<SkuHandle, EngineError> {
        let candidates: Vec<SkuId> = self
            .inner
            .routes
            .get(&order_id.route_hash())
            .map(|ids| ids.clone())
            .unwrap_or_default();
        let not_found = || EngineError::Sku(SkuError::OrderNotFound);
        match candidates.as_slice() {
            [] => Err(not_found()),
            [only] => self.handle(only),
            several => {
                // Two SKUs share a 32-bit route hash: ask each (rare).
                for id in several {
                    let handle = self.handle(id)?;
                    let order_id = *order_id;
                    if self
                        .read(&handle, move |sku, _| sku.order(&order_id).is_some())
                        .await?
                    {
                        return Ok(handle);
                    }
                }
                Err(not_found())
            }
        }
    }

    /// Records a payment from the provider's callback.
    pub async fn confirm_payment(
        &self,
        order_id: &OrderId,
        payment_ref: PaymentRef,
        amount_cents: u64,
    ) -> Result<OrderView, EngineError> {
        let handle = self.order_owner(order_id).await?;
        let command = Command::ConfirmPayment {
            order_id: *order_id,
            payment_ref,
            amount_cents,
        };
        match self.command(&handle, command).await? {
            Reply::Paid(view) => Ok(view),
            other => unreachable!("payment answered {other:?}"),
        }
    }

    pub async fn cancel(&self, order_id: &OrderId) -> Result<OrderView, EngineError> {
        let handle = self.order_owner(order_id).await?;
        match self
            .command(
                &handle,
                Command::Cancel {
                    order_id: *order_id,
                },
            )
            .await?
        {
            Reply::Cancelled(view) => Ok(view),
            other => unreachable!("cancel answered {other:?}"),
        }
    }

    /// An order, with its card's secret opened when (and only when) it is paid.
    pub async fn order(&self, order_id: &OrderId) -> Result<OrderDetails, EngineError> {
        let handle = self.order_owner(order_id).await?;
        let id = *order_id;
        let (view, revealed) = self
            .read(&handle, move |sku, _| {
                (sku.order(&id), sku.reveal(&id).ok())
            })
            .await?;
        let view = view.ok_or(EngineError::Sku(SkuError::OrderNotFound))?;
        let card = match revealed {
            Some(card) => {
                let secret = self
                    .inner
                    .keys
                    .open(&view.sku, &card.serial, &card.sealed)?;
                metrics::counter!("keydrop_cards_revealed_total").increment(1);
                Some((card.serial, secret))
            }
            None => None,
        };
        Ok(OrderDetails { view, card })
    }

    /// Orders carrying a refused payment (late, wrong amount, or a second payment):
    /// the money to refund. Across all SKUs, or one.
    pub async fn refused_payments(
        &self,
        only: Option<&SkuId>,
    ) -> Result<Vec<OrderView>, EngineError> {
        let handles: Vec<SkuHandle> = match only {
            Some(id) => vec![self.handle(id)?],
            None => self.inner.skus.iter().map(|h| h.clone()).collect(),
        };
        let mut all = Vec::new();
        for handle in handles {
            all.extend(
                self.read(&handle, |sku, _| sku.orders_with_refused_payments())
                    .await?,
            );
        }
        all.sort_by_key(|view| (view.created_at, view.order_id));
        Ok(all)
    }

    // ---- moving SKUs ----

    /// The SKU's whole durable state, card ciphertexts included, as one bundle that
    /// [`Engine::import_sku`] on another node accepts. Secrets stay sealed: the
    /// receiving node needs the same master keys.
    pub async fn export_sku(&self, id: &SkuId) -> Result<Vec<u8>, EngineError> {
        let handle = self.handle(id)?;
        self.read(&handle, |sku, seq| {
            codec::encode_snapshot(seq, sku.snapshot_ref())
        })
        .await
    }

    pub async fn import_sku(&self, bundle: &[u8]) -> Result<SkuView, EngineError> {
        let (seq, snapshot) = codec::decode_snapshot(bundle)
            .map_err(|e| EngineError::InvalidBundle(e.to_string()))?;
        if seq > BUNDLE_SEQ_MAX {
            return Err(EngineError::InvalidBundle(format!(
                "sequence number {seq} is past {BUNDLE_SEQ_MAX}"
            )));
        }
        // A bundle comes from elsewhere: its definition is held to the rules a PUT is,
        // and no reservation in it may outlive the longest TTL (either would let a
        // card be held for good).
        snapshot
            .def
            .validate()
            .map_err(|e| EngineError::InvalidBundle(e.to_string()))?;
        if let Some(order) = snapshot.orders.iter().find(|order| {
            order.status == OrderStatus::Reserved
                && order.expires_at.0.saturating_sub(order.created_at.0) > RESERVATION_TTL_MS_MAX
        }) {
            return Err(EngineError::InvalidBundle(format!(
                "order {} is reserved for longer than the longest reservation TTL",
                order.id
            )));
        }
        let sku = Sku::from_snapshot(snapshot).map_err(EngineError::InvalidBundle)?;
        let id = sku.id().clone();
        let _creating = self.inner.create_lock.lock().await;
        if self.inner.skus.contains_key(&id) {
            return Err(EngineError::SkuExists);
        }
        let record = codec::encode_snapshot(seq, sku.snapshot_ref());
        self.inner
            .journal
            .write_now(id.clone(), JournalOp::Snapshot { seq, record })
            .await
            .map_err(EngineError::from_journal)?;
        let view = sku.view(self.inner.clock.now());
        self.spawn_actor(sku, seq, 0).await?;
        tracing::info!(sku = %id, "SKU imported from bundle");
        Ok(view)
    }

    // ---- keys ----

    /// Re-seals every card not sealed under the current key, SKU by SKU, in chunks
    /// so buyers keep being served. Returns the number of cards re-sealed.
    pub async fn rotate_keys(&self) -> Result<u64, EngineError> {
        let current = self.inner.keys.current_key_id();
        let handles: Vec<SkuHandle> = self.inner.skus.iter().map(|h| h.clone()).collect();
        let mut resealed = 0u64;
        for handle in handles {
            let id = handle.shared.id.clone();
            loop {
                let stale = self
                    .read(&handle, move |sku, _| {
                        sku.cards_sealed_with_other_keys(current, RESEAL_CHUNK_CARDS_MAX)
                    })
                    .await?;
                if stale.is_empty() {
                    break;
                }
                let keys = Arc::clone(&self.inner.keys);
                let sku = id.clone();
                let fresh: Vec<(CardSerial, SealedSecret)> =
                    tokio::task::spawn_blocking(move || {
                        stale
                            .into_iter()
                            .map(|(serial, sealed)| {
                                let secret = keys.open(&sku, &serial, &sealed)?;
                                let sealed = keys.seal(&sku, &serial, &secret);
                                Ok((serial, sealed))
                            })
                            .collect::<Result<Vec<_>, crate::vault::VaultError>>()
                    })
                    .await
                    .map_err(|e| EngineError::Spawn(e.to_string()))??;
                // Rotation runs while buyers buy: a mailbox full for a moment
                // (a drop's crowd) delays it instead of stopping it until restart.
                let reply = loop {
                    match self.command(&handle, Command::Reseal(fresh.clone())).await {
                        Err(EngineError::Overloaded) => {
                            tokio::time::sleep(RESEAL_RETRY_WAIT).await;
                        }
                        reply => break reply?,
                    }
                };
                match reply {
                    Reply::Resealed { count } => {
                        resealed += count as u64;
                        metrics::counter!("keydrop_cards_resealed_total").increment(count as u64);
                    }
                    other => unreachable!("reseal answered {other:?}"),
                }
            }
        }
        tracing::info!(
            resealed,
            key = format_args!("{current:08x}"),
            "key rotation finished"
        );
        Ok(resealed)
    }

    // ---- lifecycle ----

    /// Stops taking commands, snapshots every SKU (so the next start replays
    /// little), stops the actors and closes the journal once everything is on disk.
    pub async fn shutdown(&self) {
        self.stop(true).await;
    }

    /// Stops the way a crash would, as far as the disk is concerned: no snapshots, so
    /// the next open replays the journal. Everything acknowledged is already durable.
    /// The RocksDB folder is released once the last clone of this engine is dropped.
    pub async fn halt(self) {
        self.stop(false).await;
    }

    async fn stop(&self, snapshot: bool) {
        if self.inner.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        let handles: Vec<SkuHandle> = self.inner.skus.iter().map(|h| h.clone()).collect();
        // Ask every actor first, then wait: the snapshots share group commits.
        let mut pending = Vec::new();
        for handle in handles.iter().filter(|_| snapshot) {
            let (tx, rx) = oneshot::channel();
            if handle.actor.send_message(SkuMsg::Snapshot(tx)).is_ok() {
                pending.push((handle.shared.id.clone(), rx));
            }
        }
        for (sku, rx) in pending {
            if let Ok(Err(error)) = rx.await {
                tracing::warn!(%sku, %error, "no snapshot at shutdown");
            }
        }
        for handle in &handles {
            let _ = handle
                .actor
                .stop_and_wait(None, Some(Duration::from_secs(10)))
                .await;
        }
        self.inner.skus.clear();
        self.inner.routes.clear();
        let journal = Arc::clone(&self.inner.journal);
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
        tracing::info!(skus = handles.len(), snapshot, "engine stopped");
    }
}

/// Whether `recorded` records (over all SKUs) in one tick of `interval` are few
/// enough for a waiting snapshot to go ahead.
fn is_quiet(recorded: u64, interval: Duration) -> bool {
    u128::from(recorded) * 1000 <= u128::from(QUIET_RECORDS_PER_SEC_MAX) * interval.as_millis()
}

/// Wakes the actors whose next reservation deadline has passed, one whose snapshot
/// waits once the node is quiet, and now and then every actor to prune its ended
/// orders.
async fn run_expiry_ticker(inner: Weak<Inner>, interval: Duration, prune_interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutting_down.load(Ordering::Acquire) {
            return;
        }
        if last_prune.elapsed() >= prune_interval {
            last_prune = tokio::time::Instant::now();
            for entry in inner.skus.iter() {
                let _ = entry.actor.send_message(SkuMsg::PruneEnded);
            }
        }
        let now = inner.clock.now().as_millis();
        let mut recorded = 0u64;
        for entry in inner.skus.iter() {
            let shared = &entry.shared;
            let seq = shared.published_seq();
            let before = shared.seq_at_last_tick.swap(seq, Ordering::Relaxed);
            recorded = recorded.saturating_add(seq.saturating_sub(before));
            if shared.next_expiry_ms.load(Ordering::Relaxed) <= now
                && !shared.expiry_queued.swap(true, Ordering::Relaxed)
                && entry.actor.send_message(SkuMsg::ExpireDue).is_err()
            {
                shared.expiry_queued.store(false, Ordering::Relaxed);
            }
        }
        // The journal is shared: a snapshot written while any SKU is busy holds that
        // SKU's buyers behind it, so quiet is the whole node's, and one waiting
        // snapshot goes per tick.
        if is_quiet(recorded, interval) {
            for entry in inner.skus.iter() {
                let shared = &entry.shared;
                if shared.snapshot_wanted.swap(false, Ordering::Relaxed) {
                    if entry.actor.send_message(SkuMsg::SnapshotIfDue).is_err() {
                        shared.snapshot_wanted.store(true, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_is_at_most_a_hundred_records_a_second_over_the_tick() {
        let tick = Duration::from_millis(200);
        assert!(is_quiet(0, tick));
        assert!(is_quiet(20, tick));
        assert!(!is_quiet(21, tick));
        assert!(is_quiet(100, Duration::from_secs(1)));
        assert!(!is_quiet(101, Duration::from_secs(1)));
        assert!(!is_quiet(1, Duration::from_millis(5)));
        // No overflow at the edge.
        assert!(is_quiet(u64::MAX, Duration::MAX));
    }
}

//! `postgres-direct`: the classic pessimistic design. A `cards` table; a
//! reservation takes the first available card of its SKU with `SELECT … FOR UPDATE
//! SKIP LOCKED`, marks it and inserts the order, all in one PL/pgSQL call (one
//! round trip, one transaction). One order per user is a partial unique index.
//! Driven with tokio-postgres over a fixed set of connections, with whatever
//! `synchronous_commit` the server has (reported; scripts/bench sets it on).
//!
//! The schema `keydrop_load` is dropped and recreated by every run: point this
//! target only at a database kept for benchmarks. Like the Redis baseline, it has
//! no expiry sweeper; runs use a reservation lifetime longer than the run.
//! Under contention SKIP LOCKED may answer sold out while locked cards remain (a
//! known trait of the design, counted as sold_out like any other).

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls, Statement};

use super::{Answer, OrderRef, ReserveRequest, Stock, Target, TargetInfo};
use crate::audit::{OrderState, SkuCounts, Status, TargetState};

/// Cards per INSERT while stocking.
const IMPORT_CHUNK_CARDS_MAX: usize = 10_000;
/// Orders per look-up query during the audit.
const AUDIT_CHUNK_ORDERS_MAX: usize = 10_000;
/// Connections one run may open.
pub const CONNECTIONS_MAX: usize = 256;

const SCHEMA: &str = r"
DROP SCHEMA IF EXISTS keydrop_load CASCADE;
CREATE SCHEMA keydrop_load;
CREATE TABLE keydrop_load.skus (
    sku text PRIMARY KEY,
    price_cents bigint NOT NULL,
    imported bigint NOT NULL DEFAULT 0
);
CREATE TABLE keydrop_load.cards (
    sku text NOT NULL,
    serial text NOT NULL,
    secret text NOT NULL,
    status text NOT NULL DEFAULT 'available',
    order_id text,
    PRIMARY KEY (sku, serial)
);
CREATE INDEX cards_available ON keydrop_load.cards (sku) WHERE status = 'available';
CREATE TABLE keydrop_load.orders (
    order_id text PRIMARY KEY,
    sku text NOT NULL,
    user_id text NOT NULL,
    serial text NOT NULL,
    status text NOT NULL,
    price_cents bigint NOT NULL,
    payment_ref text,
    idem_key text UNIQUE
);
CREATE UNIQUE INDEX orders_one_per_user ON keydrop_load.orders (sku, user_id)
    WHERE status IN ('reserved', 'paid');

CREATE FUNCTION keydrop_load.reserve(p_sku text, p_user text, p_idem text, p_order text)
RETURNS TABLE (r_code int, r_order text) AS $$
DECLARE v_serial text; v_existing text; v_price bigint;
BEGIN
    SELECT o.order_id INTO v_existing FROM keydrop_load.orders o WHERE o.idem_key = p_idem;
    IF FOUND THEN RETURN QUERY SELECT 1, v_existing; RETURN; END IF;
    PERFORM 1 FROM keydrop_load.orders o
        WHERE o.sku = p_sku AND o.user_id = p_user AND o.status IN ('reserved', 'paid');
    IF FOUND THEN RETURN QUERY SELECT 3, ''::text; RETURN; END IF;
    SELECT c.serial INTO v_serial FROM keydrop_load.cards c
        WHERE c.sku = p_sku AND c.status = 'available'
        LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN RETURN QUERY SELECT 2, ''::text; RETURN; END IF;
    SELECT s.price_cents INTO v_price FROM keydrop_load.skus s WHERE s.sku = p_sku;
    UPDATE keydrop_load.cards c SET status = 'reserved', order_id = p_order
        WHERE c.sku = p_sku AND c.serial = v_serial;
    INSERT INTO keydrop_load.orders
        VALUES (p_order, p_sku, p_user, v_serial, 'reserved', v_price, NULL, p_idem);
    RETURN QUERY SELECT 0, p_order;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION keydrop_load.pay(p_order text, p_ref text, p_amount bigint) RETURNS int AS $$
DECLARE o record;
BEGIN
    SELECT * INTO o FROM keydrop_load.orders x WHERE x.order_id = p_order FOR UPDATE;
    IF NOT FOUND THEN RETURN 2; END IF;
    IF o.status = 'paid' THEN
        RETURN CASE WHEN o.payment_ref = p_ref THEN 0 ELSE 4 END;
    END IF;
    IF o.status <> 'reserved' THEN RETURN 1; END IF;
    IF o.price_cents <> p_amount THEN RETURN 3; END IF;
    UPDATE keydrop_load.orders x SET status = 'paid', payment_ref = p_ref WHERE x.order_id = p_order;
    UPDATE keydrop_load.cards c SET status = 'sold' WHERE c.sku = o.sku AND c.serial = o.serial;
    RETURN 0;
END $$ LANGUAGE plpgsql;

CREATE FUNCTION keydrop_load.cancel(p_order text) RETURNS int AS $$
DECLARE o record;
BEGIN
    SELECT * INTO o FROM keydrop_load.orders x WHERE x.order_id = p_order FOR UPDATE;
    IF NOT FOUND THEN RETURN 2; END IF;
    IF o.status = 'cancelled' THEN RETURN 0; END IF;
    IF o.status <> 'reserved' THEN RETURN 1; END IF;
    UPDATE keydrop_load.orders x SET status = 'cancelled' WHERE x.order_id = p_order;
    UPDATE keydrop_load.cards c SET status = 'available', order_id = NULL
        WHERE c.sku = o.sku AND c.serial = o.serial;
    RETURN 0;
END $$ LANGUAGE plpgsql;
";

struct Connection {
    client: Client,
    reserve: Statement,
    pay: Statement,
    cancel: Statement,
}

pub struct PostgresDirect {
    connections: Vec<Connection>,
    next: AtomicUsize,
    skus: std::sync::OnceLock<Vec<String>>,
    durability: String,
    endpoint: String,
}

/// Refuses anything but a loopback host in a key=value or URL connection string.
fn check_loopback(config: &tokio_postgres::Config) -> Result<()> {
    use tokio_postgres::config::Host;
    for host in config.get_hosts() {
        match host {
            Host::Tcp(name) => {
                crate::target::http::loopback_url(&format!("http://{name}/"))
                    .context("the PostgreSQL host must be loopback")?;
            }
            // A Unix socket is local by construction.
            Host::Unix(_) => {}
        }
    }
    Ok(())
}

async fn connect_one(url: &str) -> Result<Connection> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(Connection {
        reserve: client
            .prepare("SELECT r_code, r_order FROM keydrop_load.reserve($1, $2, $3, $4)")
            .await?,
        pay: client
            .prepare("SELECT keydrop_load.pay($1, $2, $3)")
            .await?,
        cancel: client.prepare("SELECT keydrop_load.cancel($1)").await?,
        client,
    })
}

impl PostgresDirect {
    /// Connects, recreates the schema and opens `connections` connections.
    pub async fn connect(url: &str, connections: usize) -> Result<PostgresDirect> {
        let config: tokio_postgres::Config = url.parse().context("parsing the PostgreSQL URL")?;
        check_loopback(&config)?;
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX).contains(&connections),
            "PostgreSQL connections must be 1 to {CONNECTIONS_MAX}"
        );
        let (admin, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        let driver = tokio::spawn(connection);
        admin
            .batch_execute(SCHEMA)
            .await
            .context("creating the keydrop_load schema")?;
        let show = |name: &'static str| {
            let admin = &admin;
            async move {
                let row = admin.query_one(&format!("SHOW {name}"), &[]).await?;
                Ok::<String, tokio_postgres::Error>(row.get(0))
            }
        };
        let synchronous_commit = show("synchronous_commit").await?;
        let fsync = show("fsync").await?;
        let version = show("server_version").await?;
        drop(admin);
        let _ = driver.await;
        let durability = if synchronous_commit == "off" || fsync == "off" {
            format!("PostgreSQL synchronous_commit={synchronous_commit}, fsync={fsync}: acknowledged orders can be lost on a crash")
        } else {
            format!("PostgreSQL synchronous_commit={synchronous_commit}, fsync={fsync}: WAL flushed before every answer")
        };
        let mut pool = Vec::with_capacity(connections);
        for _ in 0..connections {
            pool.push(connect_one(url).await?);
        }
        Ok(PostgresDirect {
            connections: pool,
            next: AtomicUsize::new(0),
            skus: std::sync::OnceLock::new(),
            durability,
            endpoint: format!("PostgreSQL {version}, {connections} connections"),
        })
    }

    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            name: "postgres-direct".into(),
            durability: self.durability.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    fn conn(&self) -> &Connection {
        &self.connections[self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len()]
    }

    fn sku(&self, index: usize) -> Option<&str> {
        self.skus
            .get()
            .and_then(|skus| skus.get(index))
            .map(String::as_str)
    }
}

fn db_error(error: tokio_postgres::Error) -> Answer {
    Answer::Error(format!("postgres: {error}"))
}

impl Target for PostgresDirect {
    async fn stock(&self, stock: &Stock) -> Result<()> {
        let client = &self.conn().client;
        for (index, sku) in stock.skus.iter().enumerate() {
            client
                .execute(
                    "INSERT INTO keydrop_load.skus (sku, price_cents) VALUES ($1, $2)",
                    &[sku, &(stock.spec.price_cents as i64)],
                )
                .await?;
            let mut cards = stock.cards(index).peekable();
            while cards.peek().is_some() {
                let (serials, secrets): (Vec<String>, Vec<String>) =
                    cards.by_ref().take(IMPORT_CHUNK_CARDS_MAX).unzip();
                let inserted = client
                    .execute(
                        "INSERT INTO keydrop_load.cards (sku, serial, secret) \
                         SELECT $1, unnest($2::text[]), unnest($3::text[])",
                        &[sku, &serials, &secrets],
                    )
                    .await?;
                client
                    .execute(
                        "UPDATE keydrop_load.skus SET imported = imported + $2 WHERE sku = $1",
                        &[sku, &(inserted as i64)],
                    )
                    .await?;
            }
        }
        client.batch_execute("ANALYZE keydrop_load.cards").await?;
        self.skus
            .set(stock.skus.clone())
            .map_err(|_| anyhow::anyhow!("the postgres target was stocked twice"))
    }

    async fn reserve(&self, request: ReserveRequest<'_>) -> Answer {
        let Some(sku) = self.sku(request.sku) else {
            return Answer::Error(format!("SKU index {} not stocked", request.sku));
        };
        let order_id = super::redis::new_order_id(sku);
        let conn = self.conn();
        match conn
            .client
            .query_one(
                &conn.reserve,
                &[&sku, &request.user, &request.idempotency_key, &order_id],
            )
            .await
        {
            Ok(row) => match row.get::<_, i32>(0) {
                0 | 1 => Answer::Reserved(row.get(1)),
                2 => Answer::SoldOut,
                3 => Answer::PurchaseLimit,
                code => Answer::Error(format!("reserve answered {code}")),
            },
            Err(error) => db_error(error),
        }
    }

    async fn pay(&self, order: &OrderRef, amount_cents: u64) -> Answer {
        let conn = self.conn();
        let payment_ref = format!("pay-{}", order.id);
        match conn
            .client
            .query_one(
                &conn.pay,
                &[&order.id, &payment_ref, &(amount_cents as i64)],
            )
            .await
        {
            Ok(row) => match row.get::<_, i32>(0) {
                0 => Answer::Paid,
                1 => Answer::Expired,
                code => Answer::Error(format!("pay answered {code}")),
            },
            Err(error) => db_error(error),
        }
    }

    async fn cancel(&self, order: &OrderRef) -> Answer {
        let conn = self.conn();
        match conn.client.query_one(&conn.cancel, &[&order.id]).await {
            Ok(row) => match row.get::<_, i32>(0) {
                0 => Answer::Cancelled,
                1 => Answer::Expired,
                code => Answer::Error(format!("cancel answered {code}")),
            },
            Err(error) => db_error(error),
        }
    }

    async fn state(&self, orders: &[OrderRef]) -> Result<TargetState> {
        let client = &self.conn().client;
        let mut state = TargetState::default();
        let rows = client
            .query(
                "SELECT s.sku, s.imported, \
                   count(c.serial) FILTER (WHERE c.status = 'available'), \
                   count(c.serial) FILTER (WHERE c.status = 'reserved'), \
                   count(c.serial) FILTER (WHERE c.status = 'sold') \
                 FROM keydrop_load.skus s LEFT JOIN keydrop_load.cards c ON c.sku = s.sku \
                 GROUP BY s.sku, s.imported",
                &[],
            )
            .await?;
        let skus = self.skus.get().cloned().unwrap_or_default();
        let as_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
        for row in rows {
            let sku: String = row.get(0);
            if let Some(index) = skus.iter().position(|s| *s == sku) {
                state.skus.insert(
                    index,
                    SkuCounts {
                        imported: as_u64(row.get(1)),
                        available: as_u64(row.get(2)),
                        reserved: as_u64(row.get(3)),
                        sold: as_u64(row.get(4)),
                    },
                );
            }
        }
        let ids: Vec<String> = orders.iter().map(|o| o.id.clone()).collect();
        for chunk in ids.chunks(AUDIT_CHUNK_ORDERS_MAX) {
            let chunk = chunk.to_vec();
            let rows = client
                .query(
                    "SELECT order_id, status, serial FROM keydrop_load.orders WHERE order_id = ANY($1)",
                    &[&chunk],
                )
                .await?;
            for row in rows {
                let status = match row.get::<_, &str>(1) {
                    "reserved" => Status::Reserved,
                    "paid" => Status::Paid,
                    "cancelled" => Status::Cancelled,
                    other => anyhow::bail!("unknown order status {other} in PostgreSQL"),
                };
                let serial: String = row.get(2);
                state.orders.insert(
                    row.get(0),
                    OrderState {
                        status,
                        serial: (status == Status::Paid).then_some(serial),
                    },
                );
            }
        }
        Ok(state)
    }
}

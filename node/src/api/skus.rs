//! SKU routes: `PUT /v1/skus/{sku}` and `POST /v1/skus/{sku}/cards` (admin),
//! `GET /v1/skus/{sku}` (public, served from the snapshot the SKU's actor publishes:
//! buyers poll it during a drop, so it must never queue behind their orders), and
//! `GET /v1/admin/skus/{sku}` (the same with operator fields).

use std::borrow::Cow;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use keydrop_engine::limits::IMPORT_BATCH_CARDS_MAX;
use keydrop_engine::{CardSecret, CardSerial, Engine, ImportOutcome, SkuDef, SkuId, SkuView};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{parse_json, read_body, Admin, LimitedBody, SkuPath};
use super::{parse_rfc3339, rfc3339, AppState};
use crate::metrics::CARDS_IMPORTED;

/// A SKU definition is a few hundred bytes.
const SKU_BODY_BYTES_MAX: usize = 64 * 1024;
/// Card imports, CSV (streamed) or JSON (buffered: it is admin-only and parsed whole).
pub const IMPORT_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// A CSV line is a serial (≤ 128 bytes) and a secret (≤ 1024 bytes); longer ones are
/// refused before they are buffered further.
pub const CSV_LINE_BYTES_MAX: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuBody {
    name: String,
    price_cents: u64,
    per_user_limit: u32,
    #[serde(default)]
    per_device_limit: Option<u32>,
    reservation_ttl_secs: u64,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
    #[serde(default)]
    low_stock_threshold: Option<u64>,
}

impl SkuBody {
    fn into_def(self) -> Result<SkuDef, ApiError> {
        let reservation_ttl_ms = self
            .reservation_ttl_secs
            .checked_mul(1000)
            .ok_or_else(|| ApiError::invalid("reservation_ttl_secs is too large"))?;
        let time = |field: &str, value: Option<String>| {
            value.map(|text| parse_rfc3339(field, &text)).transpose()
        };
        Ok(SkuDef {
            name: self.name,
            price_cents: self.price_cents,
            per_user_limit: self.per_user_limit,
            per_device_limit: self.per_device_limit,
            reservation_ttl_ms,
            starts_at: time("starts_at", self.starts_at)?,
            ends_at: time("ends_at", self.ends_at)?,
            low_stock_threshold: self.low_stock_threshold.unwrap_or(0),
        })
    }
}

/// A SKU as the API shows it. Operator-only fields are absent from the public view.
#[derive(Debug, Serialize)]
pub struct SkuJson {
    sku: String,
    name: String,
    price_cents: u64,
    per_user_limit: u32,
    available: u64,
    reserved: u64,
    sold: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_limit: Option<u32>,
    reservation_ttl_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    starts_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ends_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    imported: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    low_stock_threshold: Option<u64>,
}

impl SkuJson {
    fn new(view: SkuView, operator: bool) -> Self {
        let def = view.def;
        SkuJson {
            sku: view.sku.to_string(),
            name: def.name,
            price_cents: def.price_cents,
            per_user_limit: def.per_user_limit,
            available: view.counts.available,
            reserved: view.counts.reserved,
            sold: view.counts.sold,
            status: view.status.as_str(),
            per_device_limit: def.per_device_limit,
            reservation_ttl_secs: def.reservation_ttl_ms / 1000,
            starts_at: def.starts_at.map(rfc3339),
            ends_at: def.ends_at.map(rfc3339),
            imported: operator.then_some(view.counts.imported),
            low_stock_threshold: operator.then_some(def.low_stock_threshold),
        }
    }
}

/// A `PUT /v1/skus/{sku}` body as a definition; the engine validates it further.
pub fn parse_sku_body(body: &[u8]) -> Result<SkuDef, ApiError> {
    parse_json::<SkuBody>(body)?.into_def()
}

pub async fn put_sku(
    State(state): State<AppState>,
    _admin: Admin,
    SkuPath(sku): SkuPath,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<SkuJson>), ApiError> {
    let engine = state.engine()?;
    let body = read_body(&headers, body, SKU_BODY_BYTES_MAX, state.body_time_limit).await?;
    let def = parse_sku_body(&body)?;
    let (view, created) = engine.define_sku(sku, def).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(SkuJson::new(view, true))))
}

pub async fn get_sku(
    State(state): State<AppState>,
    SkuPath(sku): SkuPath,
) -> Result<Json<SkuJson>, ApiError> {
    let view = state.engine()?.sku(&sku).ok_or(ApiError::SkuNotFound)?;
    Ok(Json(SkuJson::new(view, false)))
}

pub async fn get_sku_admin(
    State(state): State<AppState>,
    _admin: Admin,
    SkuPath(sku): SkuPath,
) -> Result<Json<SkuJson>, ApiError> {
    let view = state.engine()?.sku(&sku).ok_or(ApiError::SkuNotFound)?;
    Ok(Json(SkuJson::new(view, true)))
}

#[derive(Debug, Default, Serialize)]
pub struct ImportJson {
    imported: u64,
    duplicates: u64,
}

impl ImportJson {
    fn add(&mut self, outcome: ImportOutcome) {
        self.imported += outcome.imported;
        self.duplicates += outcome.duplicates;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardsBody {
    cards: Vec<CardBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CardBody {
    serial: String,
    secret: String,
}

pub async fn import_cards(
    State(state): State<AppState>,
    _admin: Admin,
    SkuPath(sku): SkuPath,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImportJson>, ApiError> {
    let engine = state.engine()?;
    if engine.sku(&sku).is_none() {
        return Err(ApiError::SkuNotFound);
    }
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let body = LimitedBody::new(&headers, body, IMPORT_BODY_BYTES_MAX, state.body_time_limit)?;
    let total = match media_type.as_str() {
        "application/json" => import_json(engine, &sku, body).await?,
        "text/csv" => import_csv(engine, &sku, body).await?,
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content type {other:?} is not accepted: send application/json or text/csv"
            )))
        }
    };
    metrics::counter!(CARDS_IMPORTED).increment(total.imported);
    tracing::info!(sku = %sku, imported = total.imported, duplicates = total.duplicates, "cards imported");
    Ok(Json(total))
}

async fn import_json(
    engine: &Engine,
    sku: &SkuId,
    body: LimitedBody,
) -> Result<ImportJson, ApiError> {
    let cards = parse_json_cards(body.collect_timed_per_part().await?)?;
    let mut total = ImportJson::default();
    total.add(engine.import_cards(sku, cards).await?);
    Ok(total)
}

/// A JSON import body: every card, or the first that is not one. The body (up to
/// 64 MiB) is let go once parsed, before the cards are checked and sealed.
pub fn parse_json_cards(body: Bytes) -> Result<Vec<(CardSerial, CardSecret)>, ApiError> {
    let CardsBody { cards } = parse_json(&body)?;
    drop(body);
    cards
        .into_iter()
        .enumerate()
        .map(|(i, card)| {
            let serial = CardSerial::parse(card.serial)
                .map_err(|e| ApiError::invalid(format!("cards[{i}]: {e}")))?;
            let secret = CardSecret::new(card.secret)
                .map_err(|e| ApiError::invalid(format!("cards[{i}]: {e}")))?;
            Ok((serial, secret))
        })
        .collect()
}

/// Parses `serial,secret` lines as they arrive and imports them a batch at a time,
/// so memory holds one batch, never the file. A bad line stops the import with a 400
/// naming it; the batches before it stay imported, and sending the corrected file
/// again is safe because known serials count as duplicates.
async fn import_csv(
    engine: &Engine,
    sku: &SkuId,
    mut body: LimitedBody,
) -> Result<ImportJson, ApiError> {
    let mut total = ImportJson::default();
    let mut parser = CsvCards::default();
    let result: Result<(), ApiError> = async {
        while let Some(chunk) = body.next_chunk().await? {
            parser.feed(&chunk)?;
            if parser.batch.len() >= IMPORT_BATCH_CARDS_MAX {
                total.add(engine.import_cards(sku, parser.take_batch()).await?);
            }
        }
        parser.finish()?;
        if !parser.batch.is_empty() {
            total.add(engine.import_cards(sku, parser.take_batch()).await?);
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(total),
        Err(error) if total.imported + total.duplicates == 0 => Err(error),
        Err(error) => {
            // The batches before the error are in, durably: counted and logged as any
            // import is, or the operator's dashboard would miss them.
            metrics::counter!(CARDS_IMPORTED).increment(total.imported);
            tracing::warn!(
                sku = %sku,
                imported = total.imported,
                duplicates = total.duplicates,
                error = error.code(),
                "card import stopped partway; the cards before the error are in"
            );
            match error {
                ApiError::InvalidRequest(message) => Err(ApiError::InvalidRequest(format!(
                    "{message} ({} cards before it were imported; sending the corrected file again is safe)",
                    total.imported
                ))),
                error => Err(error),
            }
        }
    }
}

/// A whole CSV body, arriving in `chunks`, parsed as `import_csv` parses it.
pub fn parse_csv<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<(CardSerial, CardSecret)>, ApiError> {
    let mut parser = CsvCards::default();
    let mut cards = Vec::new();
    for chunk in chunks {
        parser.feed(chunk)?;
        cards.append(&mut parser.batch);
    }
    parser.finish()?;
    cards.append(&mut parser.batch);
    Ok(cards)
}

/// Incremental `serial,secret` line parser.
#[derive(Default)]
struct CsvCards {
    /// Lines seen so far (the current line's number is `line + 1`).
    line: usize,
    /// The unfinished last line of the data fed so far.
    partial: Vec<u8>,
    batch: Vec<(CardSerial, CardSecret)>,
}

impl CsvCards {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), ApiError> {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            let (head, rest) = data.split_at(end);
            data = &rest[1..];
            if self.partial.is_empty() {
                self.line(head)?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line)?;
            }
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > CSV_LINE_BYTES_MAX {
            return Err(ApiError::invalid(format!(
                "line {}: longer than {CSV_LINE_BYTES_MAX} bytes",
                self.line + 1
            )));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ApiError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
        }
        Ok(())
    }

    fn take_batch(&mut self) -> Vec<(CardSerial, CardSecret)> {
        std::mem::take(&mut self.batch)
    }

    fn line(&mut self, raw: &[u8]) -> Result<(), ApiError> {
        self.line += 1;
        let number = self.line;
        let bad = |why: &dyn std::fmt::Display| ApiError::invalid(format!("line {number}: {why}"));
        if raw.len() > CSV_LINE_BYTES_MAX {
            return Err(bad(&format!("longer than {CSV_LINE_BYTES_MAX} bytes")));
        }
        let mut text = std::str::from_utf8(raw).map_err(|_| bad(&"not UTF-8"))?;
        if number == 1 {
            // The byte order mark spreadsheets put before "CSV UTF-8": not whitespace
            // to `trim`, and not to be part of the first serial.
            text = text.strip_prefix('\u{feff}').unwrap_or(text);
        }
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let (serial, secret) = csv_fields(text).map_err(|why| bad(&why))?;
        if number == 1
            && serial.eq_ignore_ascii_case("serial")
            && secret.eq_ignore_ascii_case("secret")
        {
            return Ok(());
        }
        let serial = CardSerial::parse(&serial).map_err(|e| bad(&e))?;
        let secret = CardSecret::new(secret.into_owned()).map_err(|e| bad(&e))?;
        self.batch.push((serial, secret));
        Ok(())
    }
}

/// A line's serial and secret. A field in double quotes (as spreadsheets write a
/// field holding a comma or a quote) is taken as written between them, `""` standing
/// for one quote; a field without them is trimmed, and an unquoted secret runs to
/// the end of the line, commas and all, as files written by hand have it. A quoted
/// field must close on its line: card secrets hold no line breaks, and a lost quote
/// would otherwise swallow the file.
fn csv_fields(line: &str) -> Result<(Cow<'_, str>, Cow<'_, str>), &'static str> {
    const EXPECTED: &str = "expected `serial,secret`";
    let (serial, rest) = match line.strip_prefix('"') {
        Some(quoted) => {
            let (serial, after) = quoted_field(quoted)?;
            let rest = after
                .trim_start()
                .strip_prefix(',')
                .ok_or("expected a comma after the quoted serial")?;
            (serial, rest)
        }
        None => {
            let (serial, rest) = line.split_once(',').ok_or(EXPECTED)?;
            (Cow::Borrowed(serial.trim_end()), rest)
        }
    };
    let rest = rest.trim_start();
    let secret = match rest.strip_prefix('"') {
        Some(quoted) => {
            let (secret, after) = quoted_field(quoted)?;
            if !after.trim().is_empty() {
                return Err("text after the quoted secret");
            }
            secret
        }
        None => Cow::Borrowed(rest),
    };
    Ok((serial, secret))
}

/// The quoted field that `text` (past its opening quote) starts with, and what
/// follows its closing quote.
fn quoted_field(text: &str) -> Result<(Cow<'_, str>, &str), &'static str> {
    const UNCLOSED: &str = "a quoted field is not closed on its line";
    let close = text.find('"').ok_or(UNCLOSED)?;
    if !text[close + 1..].starts_with('"') {
        return Ok((Cow::Borrowed(&text[..close]), &text[close + 1..]));
    }
    // Doubled quotes inside: unescape as it goes.
    let mut field = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let close = rest.find('"').ok_or(UNCLOSED)?;
        field.push_str(&rest[..close]);
        rest = &rest[close + 1..];
        match rest.strip_prefix('"') {
            Some(after_doubled) => {
                field.push('"');
                rest = after_doubled;
            }
            None => return Ok((Cow::Owned(field), rest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &str, piece: usize) -> Result<Vec<(String, String)>, String> {
        let mut parser = CsvCards::default();
        let run = |parser: &mut CsvCards| -> Result<(), ApiError> {
            for chunk in text.as_bytes().chunks(piece) {
                parser.feed(chunk)?;
            }
            parser.finish()
        };
        match run(&mut parser) {
            Ok(()) => Ok(parser
                .take_batch()
                .into_iter()
                .map(|(serial, secret)| (serial.to_string(), secret.expose().to_owned()))
                .collect()),
            Err(ApiError::InvalidRequest(message)) => Err(message),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    fn assert_parses_in_any_pieces(text: &str, expected: &[(String, String)]) {
        for piece in [1, 2, 3, 7, 100] {
            assert_eq!(
                parse_in_pieces(text, piece).unwrap(),
                expected,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn csv_lines_parse_whatever_the_chunking() {
        let text = "serial,secret\r\nS-1,AAAA\n\nS-2, B,B \nS-3,C";
        let expected = vec![
            ("S-1".to_owned(), "AAAA".to_owned()),
            ("S-2".to_owned(), "B,B".to_owned()),
            ("S-3".to_owned(), "C".to_owned()),
        ];
        assert_parses_in_any_pieces(text, &expected);
    }

    #[test]
    fn quoted_fields_are_taken_as_spreadsheets_write_them() {
        let text = concat!(
            "\"serial\",\"secret\"\r\n",
            "S-1,\"AB,CD\"\r\n",
            "\"S-2\" , \"say \"\"hi\"\"\" \n",
            "S-3,\" padded \"\n",
            "\"S-4\",plain,with,commas\n",
            "S-5,AB\"CD\n",
            "S-6,\"\"\"\"\n",
        );
        let expected: Vec<(String, String)> = [
            ("S-1", "AB,CD"),
            ("S-2", "say \"hi\""),
            ("S-3", " padded "),
            ("S-4", "plain,with,commas"),
            ("S-5", "AB\"CD"),
            ("S-6", "\""),
        ]
        .iter()
        .map(|(serial, secret)| (serial.to_string(), secret.to_string()))
        .collect();
        assert_parses_in_any_pieces(text, &expected);
    }

    #[test]
    fn a_quote_left_open_or_followed_by_text_is_refused_with_its_line() {
        for (text, why) in [
            (
                "S-1,A\nS-2,\"AB,CD\n",
                "line 2: a quoted field is not closed on its line",
            ),
            (
                "\"S-1,AB\n",
                "line 1: a quoted field is not closed on its line",
            ),
            ("S-1,\"AB\"CD\n", "line 1: text after the quoted secret"),
            (
                "\"S-1\"AB\n",
                "line 1: expected a comma after the quoted serial",
            ),
            ("S-1\n", "line 1: expected `serial,secret`"),
        ] {
            assert_eq!(parse_in_pieces(text, 3).unwrap_err(), why, "{text:?}");
        }
    }

    #[test]
    fn a_header_is_skipped_with_a_byte_order_mark_spaces_or_capitals() {
        let one = vec![("S-1".to_owned(), "A".to_owned())];
        for header in [
            "\u{feff}serial,secret\n",
            "serial, secret\n",
            " Serial ,SECRET \r\n",
            "\u{feff}SERIAL , Secret\r\n",
        ] {
            let text = format!("{header}S-1,A\n");
            for piece in [1, 2, 5, 100] {
                assert_eq!(parse_in_pieces(&text, piece).unwrap(), one, "{text:?}");
            }
        }
        // A mark before the first card is not part of its serial.
        assert_eq!(parse_in_pieces("\u{feff}S-1,A\n", 3).unwrap(), one);
        // Only the first line can be a header; later it is a card like any other.
        assert_eq!(
            parse_in_pieces("S-1,A\nserial,secret\n", 4).unwrap(),
            vec![
                ("S-1".to_owned(), "A".to_owned()),
                ("serial".to_owned(), "secret".to_owned()),
            ]
        );
    }

    #[test]
    fn bad_lines_are_named() {
        let error = parse_in_pieces("S-1,A\nS-2\nS-3,C\n", 4).unwrap_err();
        assert!(error.starts_with("line 2:"), "{error}");
        let error = parse_in_pieces("S-1,A\n,secret\n", 4).unwrap_err();
        assert!(error.starts_with("line 2:"), "{error}");
        let error = parse_in_pieces("S-1,\n", 4).unwrap_err();
        assert!(error.starts_with("line 1:"), "{error}");
        let long = format!("S-1,{}\n", "x".repeat(CSV_LINE_BYTES_MAX));
        let error = parse_in_pieces(&long, 1000).unwrap_err();
        assert!(error.starts_with("line 1:"), "{error}");
        let mut bytes = b"S-1,A\nS-2,".to_vec();
        bytes.push(0xff);
        let mut parser = CsvCards::default();
        assert!(parser.feed(&bytes).is_ok());
        assert!(parser.finish().is_err());
    }
}

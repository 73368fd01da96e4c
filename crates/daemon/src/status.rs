//! The run's status over HTTP, for a person and for a program: `/` a page that refreshes
//! itself (plain HTML and CSS, no script, no network font), `/status.json` the same data,
//! `/chart.svg` the run's charts, `/metrics` the Prometheus text.
//!
//! Everything is read fresh on each request: the journal and `rounds.jsonl` and `history.jsonl`
//! from the run directory, the loop's gauges from [`Metrics`], and the last warnings and errors
//! from [`RecentErrors`]. Nothing here writes, and no secret is shown (the journal's pending key
//! is never read out).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::journal::{Journal, ROUNDS_FILE, RoundRecord};
use crate::metrics::Metrics;
use crate::now_ms;

/// How many recent warnings and errors the page keeps.
const KEPT_ERRORS: usize = 20;
/// Seconds between the page's own refreshes.
const REFRESH_S: u32 = 5;

/// The last warnings and errors the process logged (newest last), shared with the logger.
#[derive(Debug, Default)]
pub struct RecentErrors(Mutex<VecDeque<LoggedError>>);

#[derive(Debug, Clone, Serialize)]
pub struct LoggedError {
    pub time_ms: u64,
    pub level: &'static str,
    pub message: String,
}

impl RecentErrors {
    pub fn push(&self, level: &'static str, message: String) {
        let mut kept = self.0.lock().expect("errors lock");
        if kept.len() == KEPT_ERRORS {
            kept.pop_front();
        }
        kept.push_back(LoggedError {
            time_ms: now_ms(),
            level,
            message,
        });
    }

    pub fn list(&self) -> Vec<LoggedError> {
        self.0
            .lock()
            .expect("errors lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// The one list of this process (the logger writes to it, the page reads it).
pub fn recent_errors() -> &'static RecentErrors {
    static ERRORS: std::sync::OnceLock<RecentErrors> = std::sync::OnceLock::new();
    ERRORS.get_or_init(RecentErrors::default)
}

/// What the server reads from.
#[derive(Clone)]
pub struct StatusSource {
    pub run_dir: PathBuf,
    pub metrics: Arc<Metrics>,
}

/// What must happen next, and by when.
#[derive(Debug, Clone, Serialize)]
pub struct NextAction {
    pub what: String,
    /// Ms since the Unix epoch; the reveal's deadline above all.
    pub deadline_ms: Option<u64>,
    pub opens_ms: Option<u64>,
}

/// Everything the page shows, as `/status.json` serves it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub now_ms: u64,
    pub phase: String,
    pub model_id: Option<String>,
    pub next: NextAction,
    pub rounds_revealed: u64,
    pub missed_reveals: u64,
    pub balance_shannons: Option<u64>,
    /// The model's stake after the last revealed round, as `rounds.jsonl` recorded it.
    pub stake_shannons: Option<u64>,
    pub train_step: u64,
    pub train_loss: f64,
    pub train_tokens_per_s: f64,
    /// The round whose committed weights are missing at their URL, while they are.
    pub weights_unserved_round: Option<u64>,
    /// What the model has earned, as `earnings.json` recorded it (none before its first won
    /// target was seen, or when the file cannot be read).
    pub earnings: Option<crate::earnings::EarningsSummary>,
    pub rounds: Vec<RoundRecord>,
    pub errors: Vec<LoggedError>,
    pub journal_error: Option<String>,
}

impl StatusSource {
    /// The status as of now.
    pub fn status(&self) -> Status {
        let (journal, journal_error) = match Journal::load(&Journal::path_in(&self.run_dir)) {
            Ok(journal) => (journal, None),
            Err(e) => (Journal::default(), Some(e.to_string())),
        };
        let rounds: Vec<RoundRecord> =
            somatrain_train::history::read_all(&self.run_dir.join(ROUNDS_FILE)).unwrap_or_default();
        let gauges = self.metrics.snapshot();
        let next = next_action(&journal);
        Status {
            now_ms: now_ms(),
            phase: journal.phase.name().to_string(),
            model_id: journal.model_id.map(|m| m.to_string()),
            next,
            rounds_revealed: journal.rounds_revealed,
            missed_reveals: journal.missed_reveals,
            balance_shannons: gauges.balance,
            stake_shannons: rounds.last().and_then(|r| r.stake),
            train_step: gauges.train_step,
            train_loss: gauges.train_loss,
            train_tokens_per_s: gauges.train_tokens_per_s,
            weights_unserved_round: journal
                .reupload
                .as_ref()
                .filter(|u| u.since_ms.is_some())
                .map(|u| u.round),
            earnings: crate::earnings::Earnings::load(&self.run_dir)
                .ok()
                .filter(|e| e.model_id.is_some())
                .map(|e| e.summary()),
            rounds,
            errors: recent_errors().list(),
            journal_error,
        }
    }

    /// The run's charts as SVG, or None while there is no step to draw.
    pub fn chart(&self) -> Option<String> {
        let steps = somatrain_train::history::read(&self.run_dir).ok()?;
        let rounds: Vec<RoundRecord> =
            somatrain_train::history::read_all(&self.run_dir.join(ROUNDS_FILE)).unwrap_or_default();
        let points: Vec<somatrain_charts::RoundPoint> = rounds
            .iter()
            .map(|r| somatrain_charts::RoundPoint {
                round: r.round,
                step: r.step,
                heldout_loss: r.heldout_loss,
            })
            .collect();
        somatrain_charts::svg(&somatrain_charts::RunHistory {
            steps: &steps,
            rounds: &points,
        })
        .ok()
    }
}

/// The next thing the loop must do, from its journal.
fn next_action(journal: &Journal) -> NextAction {
    match &journal.pending {
        Some(p) if p.commit_epoch.is_some() => NextAction {
            what: format!(
                "reveal round {} (committed in epoch {}) in epoch {}",
                p.round,
                p.commit_epoch.unwrap_or_default(),
                p.commit_epoch.unwrap_or_default() + 1
            ),
            deadline_ms: journal.reveal_deadline_ms.or(p.reveal_closes_ms),
            opens_ms: p.reveal_opens_ms,
        },
        Some(p) => NextAction {
            what: format!("commit round {}", p.round),
            deadline_ms: None,
            opens_ms: None,
        },
        None => NextAction {
            what: format!("train round {}", journal.rounds_revealed + 1),
            deadline_ms: None,
            opens_ms: None,
        },
    }
}

/// Serves `/`, `/status.json`, `/chart.svg` and `/metrics`.
pub fn router(source: StatusSource) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/chart.svg", get(chart_svg))
        .route("/metrics", get(metrics_text))
        .with_state(source)
}

async fn status_json(State(source): State<StatusSource>) -> Response {
    axum::Json(source.status()).into_response()
}

async fn metrics_text(State(source): State<StatusSource>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        source.metrics.render(),
    )
        .into_response()
}

async fn chart_svg(State(source): State<StatusSource>) -> Response {
    match tokio::task::spawn_blocking(move || source.chart()).await {
        Ok(Some(svg)) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        _ => (
            axum::http::StatusCode::NOT_FOUND,
            "no training step in the history yet",
        )
            .into_response(),
    }
}

async fn page(State(source): State<StatusSource>) -> Html<String> {
    let status = source.status();
    let has_chart = somatrain_train::history::read(&source.run_dir).is_ok_and(|h| !h.is_empty());
    Html(render_page(&status, has_chart))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `ms` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
}

fn render_page(s: &Status, has_chart: bool) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <title>somatrain: {phase}</title><style>\
         body{{font-family:sans-serif;margin:1.5em;max-width:76em;color:#222}}\
         .next{{font-size:1.3em;padding:.8em;border:2px solid #1f77b4;background:#eef5fb}}\
         .late{{border-color:#d62728;background:#fdeeee}}\
         .warn{{color:#a00;font-weight:bold}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:right}}\
         img{{max-width:100%}}</style></head><body>\n",
        phase = escape(&s.phase)
    );
    let _ = write!(
        html,
        "<h1>somatrain run</h1>\n<p>phase <b id=\"phase\">{}</b>; model {}; {} rounds revealed, {} missed reveals</p>\n",
        escape(&s.phase),
        s.model_id
            .as_deref()
            .map_or("not created yet".into(), escape),
        s.rounds_revealed,
        s.missed_reveals
    );
    let late = s
        .next
        .deadline_ms
        .is_some_and(|d| d.saturating_sub(s.now_ms) < 3_600_000);
    let _ = write!(
        html,
        "<div class=\"next{}\" id=\"next\">next: {}",
        if late { " late" } else { "" },
        escape(&s.next.what)
    );
    if let Some(deadline) = s.next.deadline_ms {
        let _ = write!(
            html,
            "<br>deadline <b id=\"deadline\">{}</b> ({} left)",
            utc(deadline),
            duration(deadline.saturating_sub(s.now_ms))
        );
    }
    if let Some(opens) = s.next.opens_ms.filter(|&o| o > s.now_ms) {
        let _ = write!(
            html,
            "<br>the window opens {} (in {})",
            utc(opens),
            duration(opens - s.now_ms)
        );
    }
    html.push_str("</div>\n");
    if let Some(round) = s.weights_unserved_round {
        let _ = writeln!(
            html,
            "<p class=\"warn\">The weights of round {round} are missing at their URL: they are \
             being uploaded again. Validators that cannot fetch them report the model.</p>"
        );
    }
    if let Some(e) = &s.journal_error {
        let _ = writeln!(html, "<p class=\"warn\">{}</p>", escape(e));
    }
    let soma = |v: Option<u64>| v.map_or("-".into(), somatrain_protocol::format_soma);
    let with_unit = |v: Option<u64>| {
        v.map_or("unknown".into(), |v| {
            format!("{} SOMA", somatrain_protocol::format_soma(v))
        })
    };
    let _ = writeln!(
        html,
        "<p>balance <b id=\"balance\">{}</b>; stake {}; training step {}, loss {:.4}, {:.0} \
         bytes/s</p>",
        with_unit(s.balance_shannons),
        with_unit(s.stake_shannons),
        s.train_step,
        s.train_loss,
        s.train_tokens_per_s
    );
    let _ = match &s.earnings {
        Some(e) => writeln!(
            html,
            "<p>earnings <b id=\"earnings\">{} SOMA</b> claimed from {} targets won; {} SOMA \
             awaiting a claim (the owner's share of each reward; commission pays nothing)</p>",
            somatrain_protocol::format_soma(e.claimed_shannons),
            e.targets_won,
            somatrain_protocol::format_soma(e.pending_shannons)
        ),
        None => writeln!(
            html,
            "<p>earnings <b id=\"earnings\">none yet</b> (no target won by the model seen)</p>"
        ),
    };
    html.push_str("<h2>Charts</h2>\n");
    if has_chart {
        html.push_str(
            "<img id=\"chart\" src=\"/chart.svg\" alt=\"loss, held-out rounds, learning rate and throughput over the optimizer step\" width=\"1200\" height=\"1050\">\n",
        );
    } else {
        html.push_str("<p>No training step yet.</p>\n");
    }
    html.push_str(
        "<h2>Rounds</h2>\n<table id=\"rounds\"><tr><th>round</th><th>step</th><th>held-out loss</th>\
         <th>commit epoch</th><th>reveal epoch</th><th>stake (SOMA)</th><th>balance (SOMA)</th>\
         <th>revealed</th></tr>\n",
    );
    for r in s.rounds.iter().rev() {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.round,
            r.step,
            r.heldout_loss.map_or("-".into(), |l| format!("{l:.4}")),
            r.commit_epoch,
            r.reveal_epoch,
            soma(r.stake),
            soma(r.balance),
            utc(r.time_ms)
        );
    }
    html.push_str("</table>\n<h2>Last warnings and errors</h2>\n<ul id=\"errors\">\n");
    if s.errors.is_empty() {
        html.push_str("<li>none</li>\n");
    }
    for e in s.errors.iter().rev() {
        let _ = writeln!(
            html,
            "<li>{} {}: {}</li>",
            utc(e.time_ms),
            e.level,
            escape(&e.message)
        );
    }
    let _ = write!(
        html,
        "</ul>\n<p>As of {}; this page reloads every {REFRESH_S} s. The same data: \
         <a href=\"/status.json\">/status.json</a>, <a href=\"/metrics\">/metrics</a>.</p>\n\
         </body></html>\n",
        utc(s.now_ms)
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        // 2026-12-05 13:40:00 UTC.
        assert_eq!(utc(1_796_478_000_000), "2026-12-05 13:40:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}

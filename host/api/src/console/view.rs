//! The page shell and the pieces pages share. Everything here goes through `maud`, which
//! escapes what it interpolates; `PreEscaped` appears only around constant text.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::session::{Viewer, Who};
use crate::model::{JobStatus, Millis};

/// Which section of the navigation a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// Jobs and a job's page.
    Jobs,
    /// Dead letters.
    DeadLetters,
    /// Sheets and records.
    Sheets,
    /// Plugins.
    Plugins,
    /// Environments and tokens.
    Admin,
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · jobhost" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// A whole page for a signed-in viewer.
pub fn page(viewer: &Viewer, title: &str, current: Nav, body: Markup) -> Markup {
    let link = |nav: Nav, href: &str, text: &str| {
        html! { a href=(href) class=[(nav == current).then_some("current")] { (text) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body data-csrf=(viewer.csrf) {
                header.top {
                    a.brand href="/console/" { "jobhost" }
                    nav {
                        @if viewer.is_admin() {
                            (link(Nav::Admin, "/console/admin", "Environments & tokens"))
                        } @else {
                            (link(Nav::Jobs, "/console/jobs", "Jobs"))
                            (link(Nav::DeadLetters, "/console/dead-letters", "Dead letters"))
                            (link(Nav::Sheets, "/console/sheets", "Sheets"))
                            (link(Nav::Plugins, "/console/plugins", "Plugins"))
                        }
                    }
                    span.who {
                        @match &viewer.who {
                            Who::Env { environment_name, environment_id, .. } => {
                                "environment " strong { (environment_name) } " " code { (environment_id) }
                            }
                            Who::Admin => { strong { "admin" } }
                        }
                    }
                    form.inline method="post" action="/console/sign-out" {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        button.link type="submit" { "Sign out" }
                    }
                }
                main {
                    @if let Some(flash) = &viewer.flash {
                        p.flash.error[flash.error] role="status" { (flash.text) }
                    }
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with a heading and a sentence, for whoever is not signed in.
pub fn message_page(title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { main.narrow { h1 { (title) } p { (text) } p { a href="/console/" { "Back to the console" } } } }
        }
    }
}

/// The sign-in page.
pub fn sign_in_page(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body {
                main.narrow {
                    h1 { "Sign in to jobhost" }
                    p { "Paste an environment's API token to see its jobs, or the admin token to manage environments and tokens." }
                    @if let Some(error) = error { p.flash.error role="alert" { (error) } }
                    form method="post" action="/console/sign-in" {
                        input type="hidden" name="next" value=(next);
                        label { "Token " input type="password" name="token" autocomplete="off" required autofocus; }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// A job status as a coloured badge.
pub fn status(s: JobStatus) -> Markup {
    html! { span class={ "status s-" (s) } { (s) } }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`, in a `<time>`.
pub fn time(ms: Millis) -> Markup {
    html! { time datetime=(ms) { (utc(ms)) } }
}

/// An optional time, or a dash.
pub fn maybe_time(ms: Option<Millis>) -> Markup {
    match ms {
        Some(ms) => time(ms),
        None => html! { span.none { "—" } },
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of milliseconds since the epoch.
pub fn utc(ms: Millis) -> String {
    let (date, secs) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000) / 1000);
    let (y, m, d) = civil(date);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Days since 1970-01-01 as a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of [`civil`]).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A duration in microseconds, readable.
pub fn micros(us: i64) -> String {
    match us {
        us if us < 1_000 => format!("{us} µs"),
        us if us < 1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        us => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Bytes, readable.
pub fn bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
    }
}

/// A JSON value, pretty, as text in a `<pre>`; `null` as a dash.
pub fn json(value: &Value) -> Markup {
    if value.is_null() {
        return html! { span.none { "—" } };
    }
    html! { pre.json { (serde_json::to_string_pretty(value).unwrap_or_default()) } }
}

/// At most `max` characters of `text`, and whether it was cut.
pub fn cut(text: &str, max: usize) -> (&str, bool) {
    match text.char_indices().nth(max) {
        Some((at, _)) => (&text[..at], true),
        None => (text, false),
    }
}

/// The first eight characters of a version (a content hash).
pub fn short(version: &str) -> &str {
    cut(version, 12).0
}

//! The backend's threads: writers (group commit; a savepoint per write only once a write in
//! the batch failed), readers, and the
//! notifier (`LISTEN`/`NOTIFY` plus the poll behind it). Each owns its connection and makes a
//! new one, with backoff, when it is lost.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;

use jobhost_core::error::{Error, Result, StoreError};
use jobhost_store::{ReadOp, WriteOp};

use postgres::GenericClient;

use crate::conn::{Conn, Session, Statements};
use crate::{Shared, db_error};

const DELIVERIES: &str = "jobhost_deliveries";
const COMMITS: &str = "jobhost_commits";
/// At most one `NOTIFY` per channel per host in this long: a `NOTIFY` takes a database-wide
/// lock at commit, so a busy host sends one for many commits (the poll covers the rest).
const NOTIFY_WINDOW: Duration = Duration::from_millis(250);

/// A live session, connecting again (with backoff) when there is none or it was lost. Gives
/// up after `tries` failed attempts (`None`: only when the backend stops).
fn ensure_session<'s>(
    shared: &Shared,
    session: &'s mut Option<Session>,
    lost_before: &mut bool,
    tries: Option<u32>,
) -> Option<&'s mut Session> {
    let mut backoff = Duration::from_millis(50);
    let mut failed = 0;
    loop {
        let outages = shared.outages.load(Ordering::SeqCst);
        if let Some(s) = session.as_mut().filter(|s| !s.client.is_closed()) {
            // A connection made before an outage another thread saw (the server restarted)
            // looks open until it is used: check it first, so no read fails on it.
            if s.outages_seen == outages || s.client.is_valid(Duration::from_secs(2)).is_ok() {
                s.outages_seen = outages;
                return session.as_mut();
            }
        }
        if session.take().is_some() {
            *lost_before = true;
            shared.lost("the connection to PostgreSQL was closed");
        }
        match shared.connect(*lost_before) {
            Ok(client) => *session = Some(Session::new(client, shared.outages.load(Ordering::SeqCst))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to PostgreSQL; trying again");
                *lost_before = true;
                failed += 1;
                if shared.stop.load(Ordering::SeqCst) || tries.is_some_and(|t| failed >= t) {
                    return None;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Takes queued writes in batches and commits each batch in one transaction.
pub(crate) fn writer_loop(shared: &Shared, rx: &Mutex<Receiver<WriteOp>>, max_batch: usize) {
    let mut session = None;
    let mut lost_before = false;
    let mut batch: Vec<WriteOp> = Vec::with_capacity(max_batch);
    let mut careful = 0u32;
    loop {
        if batch.is_empty() {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(op) => batch.push(op),
                Err(_) => return,
            }
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
        if let Some(refusal) = shared.refusal() {
            for op in batch.drain(..) {
                (op.reply)(Err(Error::store(refusal.clone())));
            }
            continue;
        }
        // Writes wait while the database is unreachable (they are not lost, and not yet
        // run); only a backend that is stopping drops them, which fails their callers.
        let Some(s) = ensure_session(shared, &mut session, &mut lost_before, None) else {
            batch.clear();
            continue;
        };
        let result = run_batch(shared, s, &mut batch, &mut careful);
        if s.client.is_closed() {
            shared.lost("the connection to PostgreSQL was lost");
        }
        if let Err(e) = result {
            // `BEGIN` failed: nothing ran; the batch is tried again on a new connection.
            tracing::warn!(error = %e, "cannot begin a write transaction");
            shared.lost(&e.to_string());
            session = None;
            lost_before = true;
        }
    }
}

/// Notes a schema newer than this build knows: a newer jobhost migrated the database while
/// this host ran, and this host's writes could break what the new schema keeps (e.g. counts
/// kept by the writes), so its writers refuse from then on.
fn check_schema(shared: &Shared, c: &mut postgres::Client) {
    if let Ok(row) = c.query_one("SELECT version FROM jobhost_schema", &[])
        && let Ok(version) = row.try_get::<_, i64>(0)
        && version > crate::SCHEMA_VERSION
        && shared.newer_schema.swap(version, Ordering::SeqCst) != version
    {
        tracing::error!(
            version,
            known = crate::SCHEMA_VERSION,
            "a newer jobhost migrated the database; this host no longer writes"
        );
    }
}

/// After a batch in which a write failed, this many batches run with a savepoint per write from
/// the start, so a stream of failing writes does not make every batch run twice.
const CAREFUL_BATCHES: u32 = 16;

/// Runs a batch in one transaction. First without savepoints: a savepoint per write costs two
/// round trips and a subtransaction, and writes rarely fail. If one does (it asks to discard its
/// changes, fails in the database, or panics), the transaction is rolled back and the batch runs
/// again with a savepoint per write, so the failing write is undone alone. `Err` when `BEGIN`
/// failed: nothing ran to completion and the batch is still whole.
fn run_batch(shared: &Shared, session: &mut Session, batch: &mut Vec<WriteOp>, careful: &mut u32) -> Result<()> {
    if *careful > 0 {
        *careful -= 1;
        return run_careful(shared, session, batch);
    }
    let shard = session.shard;
    let mut tx = session.client.transaction().map_err(db_error)?;
    let mut new_deliveries = 0usize;
    let mut kept_all = true;
    for op in batch.iter_mut() {
        let (kept, added) = run_op(op, &mut tx, &mut session.statements, shard);
        new_deliveries += added;
        if !kept {
            kept_all = false;
            break;
        }
    }
    if !kept_all {
        // A failed rollback means a lost connection, which the careful run's `BEGIN` reports.
        let _ = tx.rollback();
        *careful = CAREFUL_BATCHES;
        shared.written.careful();
        return run_careful(shared, session, batch);
    }
    let committed = commit(tx);
    finish(shared, batch.drain(..).map(|op| op.reply), committed, new_deliveries);
    Ok(())
}

/// Runs one write; returns whether it keeps its changes (a panic counts as discarding them:
/// the caller rolls them back) and how many deliveries it made.
fn run_op<C: GenericClient>(
    op: &mut WriteOp,
    client: &mut C,
    statements: &mut Statements,
    shard: i64,
) -> (bool, usize) {
    let mut conn = Conn::new(client, statements, shard);
    let kept = std::panic::catch_unwind(AssertUnwindSafe(|| (op.run)(&mut conn))).unwrap_or_else(|_| {
        tracing::error!("a write panicked; its changes are rolled back");
        false
    });
    (kept, conn.new_deliveries)
}

/// Runs a batch with a savepoint per write: a write that fails is rolled back to its
/// savepoint, and the others commit.
fn run_careful(shared: &Shared, session: &mut Session, batch: &mut Vec<WriteOp>) -> Result<()> {
    let shard = session.shard;
    let mut tx = session.client.transaction().map_err(db_error)?;
    let mut new_deliveries = 0usize;
    // A failure outside every write's savepoint leaves the transaction aborted, and `COMMIT`
    // of an aborted transaction rolls back without an error: such a batch is rolled back and
    // every write in it is told to run again.
    let mut broken: Option<postgres::Error> = None;
    for op in batch.iter_mut() {
        let opened = match tx.savepoint("op") {
            Ok(mut savepoint) => {
                let (kept, added) = run_op(op, &mut savepoint, &mut session.statements, shard);
                let end = if kept {
                    new_deliveries += added;
                    savepoint.commit()
                } else {
                    savepoint.rollback()
                };
                if let Err(e) = end {
                    tracing::error!(error = %e, "cannot end a savepoint");
                    broken.get_or_insert(e);
                }
                continue;
            }
            Err(e) => e,
        };
        tracing::warn!(error = %opened, "cannot open a savepoint");
        broken.get_or_insert(opened);
        // The transaction is unusable (lost connection, or aborted): the write runs against
        // it, meets the failure, and its caller sees it (retryable).
        run_op(op, &mut tx, &mut session.statements, shard);
    }
    let committed = if let Some(e) = broken {
        let _ = tx.rollback();
        Err(Error::Store(
            StoreError::caused_by("a PostgreSQL write transaction failed; nothing of it was kept", e).retryable(true),
        ))
    } else {
        commit(tx)
    };
    finish(shared, batch.drain(..).map(|op| op.reply), committed, new_deliveries);
    Ok(())
}

fn commit(tx: postgres::Transaction<'_>) -> Result<()> {
    tx.commit().map_err(|e| {
        if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) {
            // The server may have committed before the connection went: running the writes
            // again could apply them twice, so this one is not retryable.
            Error::Store(StoreError::caused_by(
                "the connection to PostgreSQL was lost during COMMIT; the write may or may not have been applied",
                e,
            ))
        } else {
            db_error(e)
        }
    })
}

/// Tells every write of a batch how its transaction ended, and wakes whoever waits on commits.
fn finish(
    shared: &Shared,
    replies: impl Iterator<Item = jobhost_store::Reply>,
    committed: Result<()>,
    new_deliveries: usize,
) {
    let mut writes = 0;
    for reply in replies {
        reply(committed.clone());
        writes += 1;
    }
    if committed.is_ok() {
        shared.written.committed(writes, 0);
        shared.wake(new_deliveries > 0);
        if new_deliveries > 0 {
            shared.notify_deliveries.store(true, Ordering::SeqCst);
        }
        shared.notify_commits.store(true, Ordering::SeqCst);
    }
}

/// Runs reads, each on its own connection's autocommit statements.
pub(crate) fn reader_loop(shared: &Shared, rx: &Mutex<Receiver<ReadOp>>) {
    let mut session = None;
    let mut lost_before = false;
    loop {
        let op = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            }
        };
        // A read does not wait long for the database: dropping it fails its caller.
        let Some(Session { client, statements, shard, .. }) =
            ensure_session(shared, &mut session, &mut lost_before, Some(3))
        else {
            continue;
        };
        let mut conn = Conn::new(client, statements, *shard);
        if std::panic::catch_unwind(AssertUnwindSafe(|| op(&mut conn))).is_err() {
            tracing::error!("a read panicked");
        }
        if client.is_closed() {
            // The read met a lost connection (and failed with it): say so until one is back.
            shared.lost("the connection to PostgreSQL was lost");
            session = None;
            lost_before = true;
        }
    }
}

/// Listens for other hosts' commits, tells them of this host's, and polls behind both.
pub(crate) fn notifier_loop(shared: &Shared) {
    let mut client: Option<postgres::Client> = None;
    let mut lost_before = false;
    let mut last_sent = [Instant::now() - NOTIFY_WINDOW; 2];
    let mut next_poll = Instant::now() + shared.poll_interval;
    let mut backoff = Duration::from_millis(50);
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next_poll {
            // The poll: whatever a lost notification hid is found within the interval.
            shared.wake(true);
            next_poll = now + shared.poll_interval;
            if let Some(c) = client.as_mut().filter(|c| !c.is_closed()) {
                check_schema(shared, c);
            }
        }
        let c = match client.as_mut() {
            Some(c) if !c.is_closed() => c,
            _ => {
                shared.listening.send_replace(false);
                if client.take().is_some() {
                    lost_before = true;
                    shared.lost("the notification connection to PostgreSQL was closed");
                }
                match shared.connect(lost_before).and_then(|mut c| {
                    c.batch_execute(&format!("LISTEN {DELIVERIES}; LISTEN {COMMITS}")).map_err(db_error)?;
                    Ok(c)
                }) {
                    Ok(c) => {
                        client = Some(c);
                        backoff = Duration::from_millis(50);
                        // Notifications sent while we were away are gone: look now.
                        shared.wake(true);
                        shared.listening.send_replace(true);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen on PostgreSQL; polling until it is back");
                        lost_before = true;
                        std::thread::sleep(backoff.min(shared.poll_interval));
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
                continue;
            }
        };
        let wait = NOTIFY_WINDOW.min(next_poll.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
        let (mut deliveries, mut commits) = (false, false);
        let mut note = |n: &postgres::Notification| {
            if n.payload() != shared.instance {
                match n.channel() {
                    DELIVERIES => deliveries = true,
                    _ => commits = true,
                }
            }
        };
        let received = (|| -> std::result::Result<(), postgres::Error> {
            let mut notifications = c.notifications();
            let first = notifications.timeout_iter(wait).next()?;
            if let Some(n) = first {
                note(&n);
                // Whatever else is already here, without waiting again.
                let mut more = notifications.iter();
                while let Some(n) = more.next()? {
                    note(&n);
                }
            }
            Ok(())
        })();
        if let Err(e) = received {
            shared.lost(&e.to_string());
            client = None;
            lost_before = true;
            continue;
        }
        if deliveries || commits {
            shared.wake(deliveries);
        }
        for (i, (flag, channel)) in
            [(&shared.notify_deliveries, DELIVERIES), (&shared.notify_commits, COMMITS)].into_iter().enumerate()
        {
            if last_sent[i].elapsed() >= NOTIFY_WINDOW && flag.swap(false, Ordering::SeqCst) {
                if let Err(e) = c.execute("SELECT pg_notify($1, $2)", &[&channel, &shared.instance]) {
                    // Lost with the connection; the other hosts' polls cover it.
                    tracing::warn!(error = %e, "cannot notify the other hosts");
                }
                last_sent[i] = Instant::now();
            }
        }
    }
}

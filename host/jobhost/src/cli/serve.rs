//! `jobhost serve`: the host as a server until SIGINT/SIGTERM.

use super::*;
use crate::config::StoreSetting;

/// Resolves on SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = crate::config::Settings::resolve(&args, |k| std::env::var(k).ok())?;
    let host = HostArgs { data: Some(settings.data.clone()), json: false, concurrency: Some(settings.concurrency) };
    let limits = Limits { max_instances: settings.concurrency, ..settings.limits.clone() };
    let runtime = Runtime::new(RuntimeConfig { limits, ..RuntimeConfig::default() })?;
    let dir = DataDir::new(host.data.as_deref())?;
    std::fs::create_dir_all(&dir.path).with_context(|| format!("cannot create {}", dir.path.display()))?;
    let host_timeout = settings.host_timeout;
    let (secret_key, retention) = (settings.secret_key.clone(), settings.retention);
    let timeouts = move |c: EngineConfig| EngineConfig {
        host_timeout,
        heartbeat_interval: (host_timeout / 6).max(std::time::Duration::from_millis(100)),
        secret_key,
        retention,
        ..c
    };
    let engine = match &settings.store {
        StoreSetting::Sqlite => open_engine_with(&dir.path, &host, Some(&runtime), timeouts)?,
        StoreSetting::Postgres { url, connections, poll_interval } => {
            use crate::store::postgres::{PgBackend, PgOptions};
            let options = PgOptions {
                writers: connections / 2,
                readers: connections - connections / 2,
                poll_interval: *poll_interval,
                ..PgOptions::new(url.clone())
            };
            let backend = tokio::task::spawn_blocking(move || PgBackend::open(options))
                .await
                .context("the store's open task failed")?
                .with_context(|| format!("cannot open the PostgreSQL store {}", crate::config::redact(url)))?;
            eprintln!("joined the fleet on PostgreSQL {}", crate::config::redact(url));
            Engine::with_backend(Arc::new(backend), engine_config(&host, Some(&runtime), timeouts)?)
        }
    };
    check_secrets(&engine).await?;
    match settings.retention {
        Some(r) => eprintln!(
            "history older than {} days is deleted (events, done deliveries, execution records; retention_days)",
            r.as_secs_f64() / 86_400.0
        ),
        None => eprintln!("history is kept forever (retention_days = 0)"),
    }
    let environment = engine.environment_named(&settings.environment).await?;
    let running = Arc::new(engine.run(Vec::new()).await?);
    let (plugins, watch) = start_plugins(&runtime, &running, &environment.id, &settings.plugins, false).await?;
    let mut events = plugins.subscribe();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let admin_token = settings.admin_token.clone().map(Arc::from);
    if admin_token.is_none() {
        eprintln!("no admin token (JOBHOST_ADMIN_TOKEN or admin_token in the config): the admin routes answer 401");
    }
    let registry = crate::api::plugins::Plugins::new(runtime.clone(), running.clone(), dir.path.join("plugins"));
    registry.adopt(&environment.id, plugins.clone()).await;
    // In a fleet the store keeps the plugins: follow what any host deploys.
    let (follow_stop, follow_stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = if engine.store().backend().exclusive() {
        None
    } else {
        registry.share_through(engine.clone());
        let cursor = registry.catch_up().await;
        Some(tokio::spawn(registry.clone().follow(cursor, async move {
            let _ = follow_stopped.await;
        })))
    };
    for (env, plugin) in registry.start_all(&engine).await {
        eprintln!("loaded plugin {} ({}) of environment {env}", plugin.name, plugin.version);
    }
    let api = crate::api::router(crate::api::ApiState { engine: engine.clone(), admin_token, plugins: Some(registry) });
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    eprintln!("listening on http://{}", listener.local_addr()?);
    eprintln!("console: http://{}/console/ (sign in with a token)", listener.local_addr()?);
    let server = tokio::spawn(crate::api::serve(listener, api, async move {
        let _ = api_stopped.await;
    }));
    eprintln!(
        "serving {} plugin(s) from {} in environment {} ({}); {}; Ctrl-C to stop",
        plugins.plugins().await.len(),
        settings.plugins.display(),
        environment.name,
        environment.id,
        match &settings.store {
            StoreSetting::Sqlite => format!("data in {}", dir.path.display()),
            StoreSetting::Postgres { url, .. } =>
                format!("store {}, local data in {}", crate::config::redact(url), dir.path.display()),
        }
    );
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = events.recv() => match event {
                Ok(ReloadEvent::Loaded { name, version, previous }) => {
                    eprintln!("loaded plugin {name} version {version}{}", previous.map(|p| format!(" (was {p})")).unwrap_or_default())
                }
                Ok(ReloadEvent::Failed { name, reason, .. }) if reason != crate::reload::ALREADY_FAILED => {
                    eprintln!("plugin {name} not reloaded, previous version keeps serving: {reason}")
                }
                Ok(ReloadEvent::Removed { name, version }) => eprintln!("unloaded plugin {name} version {version}"),
                _ => {}
            },
        }
    }
    eprintln!("stopping: finishing requests and deliveries in flight");
    let _ = api_stop.send(());
    let _ = follow_stop.send(());
    if let Some(f) = follower {
        let _ = f.await;
    }
    drop(watch);
    running.shutdown().await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the API stopped with an error: {e}"),
        Err(e) => eprintln!("the API task failed: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Before serving: the store's secrets open with this host's key (or there are none), and any
/// stored before sealing existed are sealed now. Says which key seals them.
pub(super) async fn check_secrets(engine: &Engine) -> anyhow::Result<()> {
    let sealed = engine.seal_secrets().await.context("cannot serve the store's secrets")?;
    match &engine.config().secret_key {
        Some(key) if sealed > 0 => {
            eprintln!("sealed {sealed} secret(s) stored in plain text before, with key {}", key.fingerprint())
        }
        Some(key) => eprintln!("secrets are sealed with key {}", key.fingerprint()),
        None => eprintln!(
            "no secret key (JOBHOST_SECRET_KEY or --secret-key-file): secrets cannot be stored, and plugins read none"
        ),
    }
    Ok(())
}

//! `jobhost secret set|delete|list|new-key|rotate-key` on a data directory.

use super::*;

pub(super) async fn secret(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    let (at, name) = match &cmd {
        SecretCommand::NewKey { path } => return new_key(path),
        SecretCommand::Set { at, name } | SecretCommand::Delete { at, name } => (at, name.as_str()),
        SecretCommand::List { at } | SecretCommand::RotateKey { at, .. } => (at, ""),
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let secret_key = crate::config::secret_key(at.secret_key_file.as_deref(), &var, None)?;
    let engine = crate::open_engine(&at.data, EngineConfig { secret_key, ..EngineConfig::default() })
        .with_context(|| format!("cannot open the store in {}", at.data.display()))?;
    // Names are not secret: listing needs no key. Anything else first checks the key against
    // the store (and seals what was stored before sealing existed).
    if !matches!(cmd, SecretCommand::List { .. }) {
        let sealed = engine.seal_secrets().await?;
        if sealed > 0 {
            eprintln!("sealed {sealed} secret(s) stored in plain text before");
        }
    }
    let env = engine.env(engine.environment_named(&at.environment).await?.id);
    match &cmd {
        SecretCommand::Set { .. } => {
            let mut value = zeroize::Zeroizing::new(String::new());
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)
                .context("cannot read the value from stdin")?;
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            env.set_secret(name, value).await?;
            eprintln!("secret {name} stored in environment {}", at.environment);
        }
        SecretCommand::List { .. } => {
            for name in env.secret_names().await? {
                println!("{name}");
            }
        }
        SecretCommand::Delete { .. } => {
            if !env.delete_secret(name).await? {
                bail!("environment {} has no secret {name}", at.environment);
            }
            eprintln!("secret {name} deleted from environment {}", at.environment);
        }
        SecretCommand::RotateKey { new_key_file, .. } => {
            let new = crate::config::secret_key(Some(new_key_file), &var, None)?.expect("a key from the file");
            let n = engine.rotate_secret_key(&new).await?;
            eprintln!(
                "re-sealed {n} secret(s) with key {}; restart the hosts with --secret-key-file {}",
                new.fingerprint(),
                new_key_file.display()
            );
        }
        // Answered before the store was opened.
        SecretCommand::NewKey { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a fresh key to `path`, readable by its owner only, never over an existing file.
fn new_key(path: &Path) -> anyhow::Result<ExitCode> {
    let key = crate::SecretKey::generate()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("cannot create the key file {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{}\n", &*key.to_hex()).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the key file {}", path.display()))?;
    eprintln!(
        "wrote key {} to {} (mode 0600); keep a copy apart from the data: without it the secrets cannot be read",
        key.fingerprint(),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

//! `jobhost secret set|delete|list` on a data directory.

use super::*;

pub(super) async fn secret(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    let at = match &cmd {
        SecretCommand::Set { at, .. } | SecretCommand::List { at } | SecretCommand::Delete { at, .. } => at,
    };
    let engine = crate::open_engine(&at.data, EngineConfig::default())
        .with_context(|| format!("cannot open the store in {}", at.data.display()))?;
    let env = engine.env(engine.environment_named(&at.environment).await?.id);
    match &cmd {
        SecretCommand::Set { name, .. } => {
            let mut value = String::new();
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
        SecretCommand::Delete { name, .. } => {
            if !env.delete_secret(name).await? {
                bail!("environment {} has no secret {name}", at.environment);
            }
            eprintln!("secret {name} deleted from environment {}", at.environment);
        }
    }
    Ok(ExitCode::SUCCESS)
}

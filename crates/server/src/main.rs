//! `switchboard`: serve, mint tokens, generate load.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use switchboard::auth::{now_secs, sign_hs256, ConnectClaims};
use switchboard::config::Config;
use switchboard::node::Secrets;
use switchboard::server::Server;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Real-time backend: Centrifugo-compatible WebSocket server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ConfigArgs),
    /// Print a connection JWT signed with the configured secret.
    Token(TokenArgs),
    /// Apply database migrations and exit (serve also applies them at start-up).
    Migrate(ConfigArgs),
    /// Manage accounts in the configured database.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Generate load against a running server and print one JSON line of results.
    #[command(subcommand)]
    Bench(switchboard_bench::BenchCommand),
}

/// Flags override environment variables, which override the config file.
#[derive(Args)]
struct ConfigArgs {
    /// TOML config file.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8000].
    #[arg(long)]
    listen: Option<String>,
    /// Data directory [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HS256 secret for connection tokens.
    #[arg(long)]
    token_hmac_secret: Option<String>,
    /// Key for the server API.
    #[arg(long)]
    api_key: Option<String>,
    /// Comma-separated origins allowed to connect (empty: any).
    #[arg(long)]
    allowed_origins: Option<String>,
    /// Database URL: sqlite:PATH or postgres://... [default: sqlite in the data directory].
    #[arg(long)]
    database: Option<String>,
    /// Engine shared by all nodes: redis://... or nats://... [default: in-process, one node].
    #[arg(long)]
    broker: Option<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, String> {
        let mut flags: Vec<(&str, String)> = Vec::new();
        if let Some(v) = &self.listen {
            flags.push(("listen", v.clone()));
        }
        if let Some(v) = &self.data_dir {
            flags.push(("data_dir", v.display().to_string()));
        }
        if let Some(v) = &self.token_hmac_secret {
            flags.push(("token.hmac_secret", v.clone()));
        }
        if let Some(v) = &self.api_key {
            flags.push(("api.key", v.clone()));
        }
        if let Some(v) = &self.allowed_origins {
            flags.push(("allowed_origins", v.clone()));
        }
        if let Some(v) = &self.database {
            flags.push(("database", v.clone()));
        }
        if let Some(v) = &self.broker {
            flags.push(("broker.url", v.clone()));
        }
        Config::load(self.config.as_deref(), std::env::vars(), &flags).map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin account (or fail if the username is taken).
    Create(AdminCreateArgs),
}

#[derive(Args)]
struct AdminCreateArgs {
    /// Username: 3 to 32 of a-z, 0-9, '_', '.', '-' (case-insensitive).
    #[arg(long)]
    username: String,
    /// Read the password from standard input, up to EOF (one trailing newline is dropped).
    #[arg(long, required = true)]
    password_stdin: bool,
    /// Display name [default: the username].
    #[arg(long)]
    display_name: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct TokenArgs {
    /// User id (`sub` claim).
    #[arg(long)]
    user: String,
    /// Lifetime, e.g. 1h, 30m, 10s.
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// JSON attached as connection info (`info` claim).
    #[arg(long)]
    info: Option<String>,
    /// Server-side subscription; repeat for several.
    #[arg(long = "channel")]
    channels: Vec<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Token(args) => token(args),
        Command::Migrate(args) => runtime.block_on(migrate(args)),
        Command::Admin(AdminCommand::Create(args)) => runtime.block_on(admin_create(args)),
        Command::Bench(cmd) => runtime
            .block_on(switchboard_bench::run(cmd))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    let server = Server::start(config).await.map_err(|e| e.to_string())?;
    shutdown_signal().await;
    tracing::info!("shutting down: closing clients with 3001");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn migrate(args: ConfigArgs) -> Result<(), String> {
    let config = args.load()?;
    switchboard::server::prepare_data_dir(&config).map_err(|e| e.to_string())?;
    let backend = switchboard_store::migrate(&config.database_url())
        .await
        .map_err(|e| format!("migration failed: {e}"))?;
    println!("migrations applied ({backend})");
    Ok(())
}

async fn admin_create(args: AdminCreateArgs) -> Result<(), String> {
    use switchboard::accounts;
    use switchboard_store::{NewAudit, NewUser, UserRole};

    let config = args.config.load()?;
    accounts::validate_username(&args.username)?;
    let display_name =
        accounts::validate_display_name(args.display_name.as_deref().unwrap_or(&args.username))?;
    let mut password = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = password
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&password)
        .to_string();
    accounts::validate_password(&password)?;
    switchboard::server::prepare_data_dir(&config).map_err(|e| e.to_string())?;
    let store = switchboard_store::open(&config.database_url())
        .await
        .map_err(|e| format!("cannot open the database: {e}"))?;
    let hasher = std::sync::Arc::new(accounts::Hasher::new(config.accounts.password_hash_cost));
    let password_hash = hasher.hash(password).await.map_err(|e| e.to_string())?;
    let user = store
        .create_user(NewUser {
            username: accounts::normalize_username(&args.username),
            password_hash,
            display_name,
            role: UserRole::Admin,
        })
        .await
        .map_err(|e| format!("cannot create the user: {e}"))?;
    store
        .append_audit(NewAudit {
            actor_user_id: None,
            action: "admin_created".into(),
            target: format!("user:{}", user.id),
            detail: serde_json::json!({"via": "cli", "role": "admin"}),
        })
        .await
        .map_err(|e| format!("cannot write the audit log: {e}"))?;
    store.close().await;
    println!(
        "created admin {} (id {}) in {}",
        user.username,
        user.id,
        store.backend()
    );
    Ok(())
}

fn token(args: TokenArgs) -> Result<(), String> {
    let config = args.config.load()?;
    if !config.token.rsa_public_key.is_empty() {
        return Err("the server expects RS256 tokens; sign them with your private key".into());
    }
    let (secret, generated) = Secrets::hmac_secret(&config).map_err(|e| e.to_string())?;
    if generated {
        eprintln!(
            "note: no token secret configured; generated one in {}/token_hmac_secret",
            config.data_dir.display()
        );
    }
    let info = match &args.info {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| format!("--info is not JSON: {e}"))?),
        None => None,
    };
    let now = now_secs();
    let claims = ConnectClaims {
        sub: args.user,
        exp: Some(now + args.ttl.as_secs()),
        iat: Some(now),
        info,
        channels: args.channels,
        ..Default::default()
    };
    // With `[token] audience`/`issuer` set the server requires them: mint tokens it accepts.
    let mut claims = serde_json::to_value(&claims).map_err(|e| e.to_string())?;
    for (claim, value) in [
        ("aud", &config.token.audience),
        ("iss", &config.token.issuer),
    ] {
        if !value.is_empty() {
            claims[claim] = value.as_str().into();
        }
    }
    println!("{}", sign_hs256(&secret, &claims));
    Ok(())
}

//! `infermesh-certs`: creates a development PKI (CA, server certificate and
//! client certificates carrying infermesh identities) in a directory, for
//! scripts and tests that need TLS at run time, and admin bearer tokens
//! (the token printed once, its hash appended to the control plane's tokens
//! file). It only writes files; it never installs trust anywhere, and its
//! CA is not for production.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use infermesh_runtime::admin_token::{self, TokenSet};
use infermesh_runtime::tls::pki::{DevPki, PkiError, write_dev_pki};

/// Create certificates for running infermesh with TLS locally.
#[derive(Debug, Parser)]
#[command(name = "infermesh-certs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a fresh CA, a server certificate and client certificates into a directory.
    ///
    /// Layout: ca.pem, ca-key.pem, server.pem, server-key.pem, admin.pem,
    /// admin-key.pem, edge-<region>.pem, edge-<region>-key.pem,
    /// sidecar-<endpoint>.pem, sidecar-<endpoint>-key.pem. Keys are mode 0600.
    Generate(Generate),
    /// Make an admin bearer token: print it once on stdout and append its
    /// hash to the tokens file the control plane reads (--admin-tokens-file).
    AdminToken(AdminToken),
}

#[derive(Debug, clap::Args)]
struct AdminToken {
    /// Who the token is for; names it in the control plane's logs.
    #[arg(long)]
    name: String,

    /// Tokens file to append the hash to; created (mode 0600) if missing.
    #[arg(long)]
    tokens_file: PathBuf,
}

#[derive(Debug, clap::Args)]
struct Generate {
    /// Directory to write into; created if missing.
    #[arg(long, env = "INFERMESH_CERTS_OUT")]
    out: PathBuf,

    /// Extra server name (DNS name or IP address) beyond localhost, 127.0.0.1 and ::1; repeatable.
    #[arg(long = "host", value_name = "NAME")]
    hosts: Vec<String>,

    /// Region to issue an edge client certificate for; repeatable.
    #[arg(long = "edge", value_name = "REGION")]
    edges: Vec<String>,

    /// Sidecar to issue a client certificate for, as REGION/POOL/ENDPOINT
    /// (bound: it may register only that endpoint); repeatable. Files are
    /// named after the endpoint.
    #[arg(long = "sidecar", value_name = "REGION/POOL/ENDPOINT")]
    sidecars: Vec<String>,

    /// Replace an existing CA (and every certificate) in --out.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::AdminToken(args) => admin_token(args),
    }
}

fn admin_token(args: AdminToken) -> ExitCode {
    let existing = match std::fs::read_to_string(&args.tokens_file) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            eprintln!(
                "error: --tokens-file {}: {error}",
                args.tokens_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = TokenSet::parse(&existing) {
        eprintln!(
            "error: --tokens-file {}: {error}",
            args.tokens_file.display()
        );
        return ExitCode::from(2);
    }
    let (secret, entry) = match admin_token::generate(&args.name) {
        Ok(made) => made,
        Err(error) => {
            eprintln!("error: --name: {error}");
            return ExitCode::from(2);
        }
    };
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&entry.line());
    text.push('\n');
    if let Err(error) = TokenSet::parse(&text) {
        eprintln!(
            "error: --name {:?} is already in the tokens file ({error})",
            args.name
        );
        return ExitCode::from(2);
    }
    if let Err(error) = write_private(&args.tokens_file, &text) {
        eprintln!(
            "error: --tokens-file {}: {error}",
            args.tokens_file.display()
        );
        return ExitCode::FAILURE;
    }
    println!("{secret}");
    ExitCode::SUCCESS
}

/// Writes `text` to `path` readable by the owner only, replacing it atomically.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    infermesh_runtime::fs::write_private(path, text.as_bytes())
}

fn generate(args: Generate) -> ExitCode {
    let spec = DevPki {
        hosts: args.hosts,
        edges: args.edges,
        sidecars: args.sidecars,
        overwrite: args.force,
    };
    match write_dev_pki(&args.out, &spec) {
        Ok(paths) => {
            for file in paths.files() {
                println!("{}", file.display());
            }
            warn_about_stale_files(&args.out, &paths.files());
            ExitCode::SUCCESS
        }
        Err(PkiError::Exists { path }) => {
            eprintln!(
                "error: {} already exists; pass --force to replace the CA and every certificate",
                path.display()
            );
            ExitCode::from(2)
        }
        Err(PkiError::Identity(error)) => {
            eprintln!("error: --edge/--sidecar: {error}");
            ExitCode::from(2)
        }
        Err(PkiError::BadDnsName { name }) => {
            eprintln!("error: --host {name:?} is not a valid DNS name or IP address");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Certificates left from a replaced CA no longer verify; say so rather than delete them.
fn warn_about_stale_files(dir: &Path, written: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_pem = path.extension().is_some_and(|ext| ext == "pem");
        if is_pem && !written.contains(&path.as_path()) {
            eprintln!(
                "warning: {} was not rewritten; it belongs to the replaced CA",
                path.display()
            );
        }
    }
}

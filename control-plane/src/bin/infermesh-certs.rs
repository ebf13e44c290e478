//! `infermesh-certs`: creates a development PKI (CA, server certificate and
//! client certificates carrying infermesh identities) in a directory, for
//! scripts and tests that need TLS at run time. It only writes files; it
//! never installs trust anywhere, and its CA is not for production.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// sidecar-<name>.pem, sidecar-<name>-key.pem. Keys are mode 0600.
    Generate(Generate),
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

    /// Name to issue a sidecar client certificate for; repeatable.
    #[arg(long = "sidecar", value_name = "NAME")]
    sidecars: Vec<String>,

    /// Replace an existing CA (and every certificate) in --out.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let Command::Generate(args) = Cli::parse().command;
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

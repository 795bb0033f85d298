//! `enclave access`: access requests and grants from the enclave host, the same workflow the gateway
//! serves (`enclave::access`). Each step is taken as an account with the step's role — a researcher
//! files, board members approve, reject, revoke and set four-eyes — signed in with that account's two
//! factors (API token from `ENCLAVE_TOKEN` or `--token`, and `--totp`), so that four-eyes on the host
//! needs two members' factors as it does in the web UI and the API; naming an account is not enough.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use enclave::DataDir;
use enclave::access::{Grant, NewRequest, Request};
use enclave::audit::Via;
use notebooks_gateway::auth::Accounts;

/// The acting account's two factors.
#[derive(Args)]
pub struct Factors {
    /// The account's API token (read from ENCLAVE_TOKEN when not given, so it stays out of the history).
    #[arg(long, env = "ENCLAVE_TOKEN", hide_env_values = true)]
    token: String,
    /// The current 6-digit code of the account's authenticator.
    #[arg(long)]
    totp: String,
}

/// The `enclave access` subcommands.
#[derive(Subcommand)]
pub enum AccessCommand {
    /// File an access request for a researcher (the account must be an enabled researcher).
    Request {
        /// The researcher.
        #[arg(long = "as")]
        researcher: String,
        /// The project.
        #[arg(long)]
        project: String,
        /// What the data is for.
        #[arg(long)]
        purpose: String,
        /// A dataset (repeat for several).
        #[arg(long = "dataset", required = true)]
        datasets: Vec<String>,
        /// ε asked per dataset.
        #[arg(long)]
        epsilon: f64,
        /// δ asked per dataset (default 1e-6).
        #[arg(long)]
        delta: Option<f64>,
        /// How many days the grant should last.
        #[arg(long)]
        days: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// The acting account's two factors.
        #[command(flatten)]
        factors: Factors,
    },
    /// Access requests, newest first.
    List {
        /// Only this researcher's.
        #[arg(long)]
        researcher: Option<String>,
        /// Only these: pending, approved or rejected.
        #[arg(long)]
        status: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Approve a request (as a board member), with at most the ε and days asked.
    Approve {
        /// Request number.
        id: i64,
        /// The approving board member (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
        /// ε to grant per dataset (default: as asked).
        #[arg(long)]
        epsilon: Option<f64>,
        /// Days to grant (default: as asked).
        #[arg(long)]
        days: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// The acting account's two factors.
        #[command(flatten)]
        factors: Factors,
    },
    /// Reject a request with a reason (as a board member).
    Reject {
        /// Request number.
        id: i64,
        /// Why.
        #[arg(long)]
        reason: String,
        /// The rejecting board member (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
        /// The acting account's two factors.
        #[command(flatten)]
        factors: Factors,
    },
    /// Revoke a grant (as a board member): its budgets end now with nothing left to spend.
    Revoke {
        /// Grant number.
        grant: i64,
        /// Why.
        #[arg(long)]
        reason: String,
        /// The revoking board member (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
        /// The acting account's two factors.
        #[command(flatten)]
        factors: Factors,
    },
    /// Grants, newest first.
    Grants {
        /// Only this researcher's.
        #[arg(long)]
        researcher: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Set how many board members must approve requests for a dataset (1, or 2: four-eyes).
    RequireApprovals {
        /// Dataset.
        dataset: String,
        /// 1 or 2.
        approvals: u32,
        /// The board member who sets it (default: the login name).
        #[arg(long, env = "USER", default_value = "unknown")]
        by: String,
        /// The acting account's two factors.
        #[command(flatten)]
        factors: Factors,
    },
}

/// Fails unless `name` is an enabled account with `role` that signs in with `factors` (the sign-in is
/// recorded like any other).
fn act_as(accounts: &Accounts, name: &str, role: &str, factors: &Factors) -> Result<()> {
    let ok = accounts
        .list()?
        .iter()
        .any(|u| u.user == name && u.role == role && !u.disabled);
    if !ok {
        bail!(
            "'{name}' is not an enabled {role} account (see `enclave users list`; pass --by or --as)"
        );
    }
    accounts.sign_in(
        name,
        &factors.token,
        factors.totp.trim(),
        "local",
        "cli",
        std::time::SystemTime::now(),
    )?;
    Ok(())
}

fn print_request(r: &Request) {
    out!(
        "request {} by {} [{}]: {} — ε {} per dataset, δ {:e}, {} days, on {}",
        r.id,
        r.researcher,
        r.status,
        r.project,
        r.epsilon,
        r.delta,
        r.days,
        r.datasets.join(", ")
    );
    out!("  purpose: {}", r.purpose.replace('\n', "\n           "));
    for a in &r.approvals {
        out!(
            "  approved by {} at {}: ε {}, {} days",
            a.member,
            a.at,
            a.epsilon,
            a.days
        );
    }
    if r.status == "pending" {
        out!(
            "  approvals: {} of {}",
            r.approvals.len(),
            r.approvals_required
        );
    }
    if let Some(reason) = &r.reason {
        out!(
            "  rejected by {}: {reason}",
            r.decided_by.as_deref().unwrap_or("?")
        );
    }
    if let Some(g) = r.grant_id {
        out!("  grant {g}");
    }
}

fn print_grant(g: &Grant) {
    out!(
        "grant {} (request {}) to {} [{}]: {} — ε {} per dataset, δ {:e}, until {}, on {}; approved by {}",
        g.id,
        g.request_id,
        g.researcher,
        g.status,
        g.project,
        g.epsilon,
        g.delta,
        g.expires_at,
        g.datasets.join(", "),
        g.approved_by.join(", ")
    );
    if let (Some(by), Some(reason)) = (&g.revoked_by, &g.reason) {
        out!(
            "  revoked by {by} at {}: {reason}",
            g.revoked_at.as_deref().unwrap_or("?")
        );
    }
}

/// Runs one `enclave access` command.
pub fn run(dir: &DataDir, command: AccessCommand) -> Result<()> {
    let keystore = dir.keystore()?;
    let ledger = dir.ledger(&keystore)?;
    let catalog = dir.catalog()?;
    let accounts = Accounts::open(dir, std::time::Duration::from_secs(3600))?;
    let via = |what: &str| Via::local(&format!("cli access {what}"));
    match command {
        AccessCommand::Request {
            researcher,
            project,
            purpose,
            datasets,
            epsilon,
            delta,
            days,
            json,
            factors,
        } => {
            act_as(&accounts, &researcher, "researcher", &factors)?;
            let new = NewRequest {
                project,
                purpose,
                datasets,
                epsilon,
                delta,
                days,
            };
            let r = ledger.request_access(&catalog, &researcher, &via("request"), &new)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_request(&r);
            }
        }
        AccessCommand::List {
            researcher,
            status,
            json,
        } => {
            let requests = ledger.access_requests(researcher.as_deref(), status.as_deref())?;
            if json {
                out!("{}", serde_json::to_string_pretty(&requests)?);
            } else if requests.is_empty() {
                out!("no access requests");
            } else {
                requests.iter().for_each(print_request);
            }
        }
        AccessCommand::Approve {
            id,
            by,
            epsilon,
            days,
            json,
            factors,
        } => {
            act_as(&accounts, &by, "board", &factors)?;
            let d = ledger.approve_access(&catalog, &by, &via("approve"), id, epsilon, days)?;
            if json {
                out!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_request(&d.request);
                match &d.grant {
                    Some(g) => print_grant(g),
                    None => out!(
                        "  waiting for {} more approval(s) from other board members",
                        d.request.approvals_required as usize - d.request.approvals.len()
                    ),
                }
            }
        }
        AccessCommand::Reject {
            id,
            reason,
            by,
            factors,
        } => {
            act_as(&accounts, &by, "board", &factors)?;
            print_request(&ledger.reject_access(&by, &via("reject"), id, &reason)?);
        }
        AccessCommand::Revoke {
            grant,
            reason,
            by,
            factors,
        } => {
            act_as(&accounts, &by, "board", &factors)?;
            print_grant(&ledger.revoke_grant(&by, &via("revoke"), grant, &reason)?);
        }
        AccessCommand::Grants { researcher, json } => {
            let grants = ledger.grants(researcher.as_deref())?;
            if json {
                out!("{}", serde_json::to_string_pretty(&grants)?);
            } else if grants.is_empty() {
                out!("no grants");
            } else {
                grants.iter().for_each(print_grant);
            }
        }
        AccessCommand::RequireApprovals {
            dataset,
            approvals,
            by,
            factors,
        } => {
            act_as(&accounts, &by, "board", &factors)?;
            ledger.set_approvals_required(
                &catalog,
                &by,
                &via("require-approvals"),
                &dataset,
                approvals,
            )?;
            out!(
                "requests for {dataset} now need {approvals} approval(s) from different board members"
            );
        }
    }
    Ok(())
}

//! The access workflow as the gateway serves it: Cedar decides who may take each step — a researcher
//! files requests (`request_access` on every dataset named), a board member approves, rejects and
//! revokes (`manage_grants` on every dataset of the request or grant) — and each step runs as the
//! signed-in caller, with the protocol, peer, session and decision in its audit record. A denied step
//! is recorded (rule `access`) and its refusal carries the record's receipt. The workflow's own rules
//! (four-eyes, terms, states) are `enclave::access`'s.
//!
//! Lists show a caller what is theirs (their requests and grants) and, to a board member, whatever Cedar
//! lets them manage.

use std::collections::HashMap;
use std::time::SystemTime;

use catalog::CatalogStore;
use enclave::access::{Decision, Grant, NewRequest, Request};
use enclave::audit::Draft;

use crate::auth::Caller;
use crate::authz::{Action, DatasetRef};
use crate::service::{Gateway, GatewayError, Peer, internal, refused_with};

impl Gateway {
    /// Cedar's decision on `caller` taking `action` on every one of `datasets`: allowed only if each is;
    /// the summary names the deciding policies (of the first denial, else of the last dataset). A dataset
    /// the catalog does not have is decided with no provider (the workflow then refuses it by name).
    fn decide_each(
        &self,
        caller: &Caller,
        action: Action,
        datasets: &[String],
    ) -> Result<(bool, String), GatewayError> {
        let policies = self.policies().current();
        let mut summary = String::from("allow []");
        for name in datasets {
            let provider = match self.catalog().version(name, None) {
                Ok(v) => v.version.provenance.provider,
                Err(catalog::Error::UnknownDataset(_)) => String::new(),
                Err(e) => return Err(internal(e)),
            };
            let verdict = policies
                .decide(
                    caller,
                    None,
                    action,
                    DatasetRef {
                        name,
                        provider: &provider,
                    },
                    None,
                    SystemTime::now(),
                )
                .map_err(internal)?;
            summary = verdict.summary();
            if !verdict.allowed {
                return Ok((false, summary));
            }
        }
        Ok((true, summary))
    }

    /// Decides `action` for `caller`, recording a denial (rule `access`) with what was attempted.
    fn authorize_step(
        &self,
        caller: &Caller,
        peer: &Peer,
        action: Action,
        datasets: &[String],
        what: &str,
    ) -> Result<enclave::audit::Via, GatewayError> {
        let (allowed, decision) = self.decide_each(caller, action, datasets)?;
        let via = Self::via(caller, peer, decision);
        if allowed {
            return Ok(via);
        }
        Err(self.refuse_step(caller, &via, datasets, what))
    }

    /// Records that `caller` may not take the step `what`, and returns the refusal with its receipt.
    fn refuse_step(
        &self,
        caller: &Caller,
        via: &enclave::audit::Via,
        datasets: &[String],
        what: &str,
    ) -> GatewayError {
        let message = format!("{} may not {what}", caller.user);
        let draft = Draft::query(&caller.user, via, &datasets.join(", "), what);
        match self.ledger().refuse(&draft, "access", &message) {
            Ok(record) => refused_with("access", message, &record),
            Err(e) => e.into(),
        }
    }

    /// Looks up what a step is about: an unknown request or grant is "not found" only to a caller who
    /// administers the enclave; anyone else gets the same recorded refusal as for one they may not touch,
    /// so numbers cannot be probed.
    fn lookup<T>(
        &self,
        caller: &Caller,
        peer: &Peer,
        what: &str,
        found: Result<T, enclave::Error>,
    ) -> Result<T, GatewayError> {
        match found {
            Err(enclave::Error::Access {
                rule: enclave::access::Rule::Unknown,
                message,
            }) => {
                let verdict = self
                    .policies()
                    .current()
                    .decide_platform(caller, Action::Administer)
                    .map_err(internal)?;
                if verdict.allowed {
                    return Err(enclave::Error::Access {
                        rule: enclave::access::Rule::Unknown,
                        message,
                    }
                    .into());
                }
                let via = Self::via(caller, peer, verdict.summary());
                Err(self.refuse_step(caller, &via, &[], what))
            }
            other => Ok(other?),
        }
    }

    /// Files the caller's access request.
    pub fn request_access(
        &self,
        caller: &Caller,
        peer: &Peer,
        new: &NewRequest,
    ) -> Result<Request, GatewayError> {
        let via = self.authorize_step(
            caller,
            peer,
            Action::RequestAccess,
            &new.datasets,
            "request access",
        )?;
        Ok(self
            .ledger()
            .request_access(self.catalog(), &caller.user, &via, new)?)
    }

    /// Whether `caller` may manage grants on every one of `datasets` (no record: for lists). Cedar is
    /// asked once per dataset and the answers kept in `memo`, so a list of thousands of requests over a
    /// few datasets costs a few decisions.
    fn manages(
        &self,
        caller: &Caller,
        datasets: &[String],
        memo: &mut HashMap<String, bool>,
    ) -> Result<bool, GatewayError> {
        for d in datasets {
            let allowed = match memo.get(d) {
                Some(a) => *a,
                None => {
                    let a = self
                        .decide_each(caller, Action::ManageGrants, std::slice::from_ref(d))?
                        .0;
                    memo.insert(d.clone(), a);
                    a
                }
            };
            if !allowed {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The caller's own requests, and those whose datasets they may manage; newest first.
    pub fn access_requests(&self, caller: &Caller) -> Result<Vec<Request>, GatewayError> {
        let (mut out, mut memo) = (Vec::new(), HashMap::new());
        for r in self.ledger().access_requests(None, None)? {
            if r.researcher == caller.user || self.manages(caller, &r.datasets, &mut memo)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// One request, if the caller filed it or may manage its datasets (else refused, recorded).
    pub fn access_request(
        &self,
        caller: &Caller,
        peer: &Peer,
        id: i64,
    ) -> Result<Request, GatewayError> {
        let what = format!("read access request {id}");
        let r = self.lookup(caller, peer, &what, self.ledger().access_request(id))?;
        if r.researcher != caller.user {
            self.authorize_step(
                caller,
                peer,
                Action::ManageGrants,
                &r.datasets,
                &format!("read access request {id}"),
            )?;
        }
        Ok(r)
    }

    /// The caller's approval of request `id` (at most the ε and days asked).
    pub fn approve_access(
        &self,
        caller: &Caller,
        peer: &Peer,
        id: i64,
        epsilon: Option<f64>,
        days: Option<u32>,
    ) -> Result<Decision, GatewayError> {
        let what = format!("approve access request {id}");
        let r = self.lookup(caller, peer, &what, self.ledger().access_request(id))?;
        let via = self.authorize_step(caller, peer, Action::ManageGrants, &r.datasets, &what)?;
        Ok(self
            .ledger()
            .approve_access(self.catalog(), &caller.user, &via, id, epsilon, days)?)
    }

    /// The caller's rejection of request `id`.
    pub fn reject_access(
        &self,
        caller: &Caller,
        peer: &Peer,
        id: i64,
        reason: &str,
    ) -> Result<Request, GatewayError> {
        let what = format!("reject access request {id}");
        let r = self.lookup(caller, peer, &what, self.ledger().access_request(id))?;
        let via = self.authorize_step(caller, peer, Action::ManageGrants, &r.datasets, &what)?;
        Ok(self
            .ledger()
            .reject_access(&caller.user, &via, id, reason)?)
    }

    /// The caller's revocation of grant `id`.
    pub fn revoke_grant(
        &self,
        caller: &Caller,
        peer: &Peer,
        id: i64,
        reason: &str,
    ) -> Result<Grant, GatewayError> {
        let what = format!("revoke grant {id}");
        let g = self.lookup(caller, peer, &what, self.ledger().grant(id))?;
        let via = self.authorize_step(caller, peer, Action::ManageGrants, &g.datasets, &what)?;
        Ok(self.ledger().revoke_grant(&caller.user, &via, id, reason)?)
    }

    /// The caller's own grants, and those whose datasets they may manage; newest first.
    pub fn grants(&self, caller: &Caller) -> Result<Vec<Grant>, GatewayError> {
        let (mut out, mut memo) = (Vec::new(), HashMap::new());
        for g in self.ledger().grants(None)? {
            if g.researcher == caller.user || self.manages(caller, &g.datasets, &mut memo)? {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Sets how many board members must approve requests for `dataset` (1, or 2 for four-eyes).
    pub fn set_approvals_required(
        &self,
        caller: &Caller,
        peer: &Peer,
        dataset: &str,
        approvals: u32,
    ) -> Result<(), GatewayError> {
        let datasets = [dataset.to_owned()];
        let via = self.authorize_step(
            caller,
            peer,
            Action::ManageGrants,
            &datasets,
            &format!("set the approvals {dataset} requires"),
        )?;
        Ok(self.ledger().set_approvals_required(
            self.catalog(),
            &caller.user,
            &via,
            dataset,
            approvals,
        )?)
    }
}

//! Who acts: leader election on a Lease, and where the leader can be reached.
//!
//! [`flyball_k8s::LeaderElection`] -> `leading` (act only while true) ; GET the Lease every
//! `poll_every` (and after a failed forward) -> holder identity -> `leader` (its gRPC URI, for
//! [`crate::forward`]).
//!
//! The Lease crate only says whether this replica holds the lease, so the holder is read from
//! the Lease itself. Reading it is cheap (one small GET every few seconds per follower), works on
//! any API server, and a stale answer only costs forwarded reports until the next read.

use std::sync::Arc;
use std::time::Duration;

use flyball_k8s::{LeaderElection, LeaseConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::forward::leader_uri;
use crate::tls::GrpcTls;

/// Reads asked for by failed forwards are at least this far apart.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// Whether this replica acts, and where reports go when it does not.
#[derive(Debug)]
pub struct Leadership {
    /// This replica's Lease identity.
    pub identity: String,
    /// True while this replica holds the Lease: only then are replicas set.
    pub leading: watch::Receiver<bool>,
    /// The leader's gRPC URI, when known and not this replica.
    pub leader: watch::Receiver<Option<String>>,
    /// Ask for the Lease to be read again now.
    pub refresh: Arc<Notify>,
    /// Whether followers forward what they receive (false for a lone replica).
    pub forward: bool,
    /// How long a hand-over may take: a leader that stops renewing is named by the Lease for a
    /// Lease duration, then the next claim and the followers' next read. `None` without a Lease.
    pub hand_over: Option<Duration>,
    election: Option<LeaderElection>,
    poller: Option<JoinHandle<()>>,
    /// Keeps fixed channels open.
    _fixed: Option<(watch::Sender<bool>, watch::Sender<Option<String>>)>,
}

// === impl Leadership ===

impl Leadership {
    /// A lone replica: always leading, nobody to forward to.
    pub fn standalone() -> Self {
        let (leading_tx, leading) = watch::channel(true);
        let (leader_tx, leader) = watch::channel(None);
        Leadership {
            identity: String::new(),
            leading,
            leader,
            refresh: Arc::new(Notify::new()),
            forward: false,
            hand_over: None,
            election: None,
            poller: None,
            _fixed: Some((leading_tx, leader_tx)),
        }
    }

    /// Leadership decided elsewhere (another election, or a test): `leading` and `leader` as
    /// given; followers forward.
    pub fn from_channels(
        identity: &str,
        leading: watch::Receiver<bool>,
        leader: watch::Receiver<Option<String>>,
    ) -> Self {
        Leadership {
            identity: identity.to_owned(),
            leading,
            leader,
            refresh: Arc::new(Notify::new()),
            forward: true,
            hand_over: None,
            election: None,
            poller: None,
            _fixed: None,
        }
    }

    /// Competes for the Lease `lease` names and follows who holds it, reading the Lease every
    /// `poll_every`.
    pub async fn elect(
        client: kube::Client,
        lease: &LeaseConfig,
        poll_every: Duration,
    ) -> Result<Self, flyball_k8s::Error> {
        let election = LeaderElection::start(client.clone(), lease).await?;
        let leading = election.is_leader();
        let (leader_tx, leader) = watch::channel(None);
        let refresh = Arc::new(Notify::new());
        let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
        let poller = tokio::spawn(follow_holder(
            api,
            lease.lease_name.clone(),
            lease.identity.clone(),
            leading.clone(),
            leader_tx,
            refresh.clone(),
            poll_every,
        ));
        tracing::info!(
            identity = %lease.identity,
            lease = %format_args!("{}/{}", lease.namespace, lease.lease_name),
            "competing for the leader Lease; only its holder sets replicas"
        );
        Ok(Leadership {
            identity: lease.identity.clone(),
            leading,
            leader,
            refresh,
            forward: true,
            hand_over: Some(lease.lease_duration + poll_every + MIN_REFRESH_GAP),
            election: Some(election),
            poller: Some(poller),
            _fixed: None,
        })
    }

    /// Stops acting and releases the Lease, so another replica takes over without waiting for
    /// it to expire.
    pub async fn step_down(mut self) {
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
        if let Some(election) = self.election.take()
            && let Err(error) = election.step_down().await
        {
            tracing::warn!(%error, "could not release the leader Lease; it will expire");
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
    }
}

/// Reads the Lease's holder every `poll_every`, when leadership changes, and when asked; sends
/// the holder's URI unless this replica holds it.
async fn follow_holder(
    api: Api<Lease>,
    name: String,
    identity: String,
    mut leading: watch::Receiver<bool>,
    leader: watch::Sender<Option<String>>,
    refresh: Arc<Notify>,
    poll_every: Duration,
) {
    let mut failing = false;
    loop {
        match api.get_opt(&name).await {
            Ok(lease) => {
                failing = false;
                let holder = lease
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .filter(|h| !h.is_empty());
                let uri = holder
                    .as_deref()
                    .filter(|h| *h != identity)
                    .and_then(leader_uri);
                if holder.as_deref().is_some_and(|h| h != identity) && uri.is_none() {
                    tracing::debug!(
                        ?holder,
                        "the leader advertises no address; reports stay here"
                    );
                }
                leader.send_if_modified(|current| {
                    if *current == uri {
                        return false;
                    }
                    tracing::info!(leader = ?uri, "leader address");
                    *current = uri;
                    true
                });
            }
            // The leader last read is still the best guess: a failed read (a 429, an API server
            // restarting) says nothing about who leads, and forgetting it would hold every
            // report back until the next read.
            Err(error) => {
                if !failing {
                    tracing::warn!(lease = %name, %error, "cannot read the leader Lease");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll_every) => {}
            // Every failed forward asks; reading at most once a second keeps a dead leader from
            // turning each report into a GET.
            () = async {
                refresh.notified().await;
                tokio::time::sleep(poll_every.min(MIN_REFRESH_GAP)).await;
            } => {}
            changed = leading.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// A channel to the leader at `uri` (as the Lease names it), connected on first use: over TLS
/// when this replica's gRPC port has it, checking the leader against the same CA.
pub fn leader_channel(
    uri: &str,
    tls: Option<&GrpcTls>,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let tls = tls.and_then(GrpcTls::client_config);
    // The Lease names the leader's address; the scheme is this replica's to choose.
    let target = match (&tls, uri.strip_prefix("http://")) {
        (Some(_), Some(authority)) => format!("https://{authority}"),
        _ => uri.to_owned(),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(target)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // A connection gone half-open (no FIN, no RST: a node that vanished, a conntrack entry
        // that expired) must be noticed: a follower only reads on its follow stream, and would
        // wait on a dead one for as long as the Lease names that leader.
        .http2_keep_alive_interval(KEEPALIVE_EVERY)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A connection to the leader with nothing received for this long is pinged...
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);
/// ...and given up when the ping is not answered within this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

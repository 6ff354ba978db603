//! Leader election on a `coordination.k8s.io/v1` Lease, through `kube-lease-manager`.
//!
//! The protocol (apply to take a free lease, strategic patches to renew and release, waiting
//! out a holder's expiry) is the crate's; this module turns it into a `watch::Receiver<bool>`
//! and an orderly step-down (stop acting first, then release the lease), and adds the renew
//! deadline the crate lacks: the crate keeps saying "leader" while its renewals fail (it logs
//! and backs off), but after `lease_duration` another instance may take the lease. So the
//! holder reads the Lease every `renew_margin / 4` and leads only while the claim it last saw
//! there has more than `renew_margin / 2` left; when renewals fail (403 after an RBAC change,
//! 5xx, a partition) it stops acting before the claim lapses, and acts again once a renewal
//! lands. The cut-off is a timer, and reads run beside it, each bounded by the check period
//! (kube's client has no read timeout): a read stuck on a half-open connection neither delays
//! the cut-off nor stops the checks.
//!
//! The crate creates the Lease only when it starts; once the Lease is deleted (`kubectl delete
//! lease` is the usual way to unstick an election) every sync meets a 404 and backs off for
//! good, so nobody would lead again. So every instance checks every `lease_duration` that the
//! Lease exists and recreates it, empty as the crate does, for the crate's next sync to take.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ObjectMeta, PostParams};
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder, LeaseParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::error::Elapsed;

use crate::error::Error;

/// Which lease, who we are, and how long a claim lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per instance; the pod name is the usual choice.
    pub identity: String,
    /// How long a claim is valid after its last renewal. Whole seconds, at least 2.
    pub lease_duration: Duration,
    /// How long before expiry the holder renews. Whole seconds, at least 1, below
    /// `lease_duration`; also the clock skew between nodes the claim tolerates.
    pub renew_margin: Duration,
}

// === impl LeaseConfig ===

impl LeaseConfig {
    /// A 15 s lease renewed 5 s before expiry: a crashed leader is replaced within ~15 s,
    /// and a live one renews every ~10 s.
    pub fn new(namespace: &str, lease_name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_margin: Duration::from_secs(5),
        }
    }

    /// The crate takes whole seconds and panics on inconsistent values; check them here.
    fn params(&self) -> Result<LeaseParams, Error> {
        let whole = |field: &'static str, d: Duration| -> Result<u64, Error> {
            if d.subsec_nanos() != 0 {
                return Err(Error::Config {
                    field,
                    value: format!("{d:?}"),
                    rule: "must be whole seconds",
                });
            }
            Ok(d.as_secs())
        };
        let duration = whole("leaseDuration", self.lease_duration)?;
        let margin = whole("renewMargin", self.renew_margin)?;
        if margin == 0 {
            return Err(Error::Config {
                field: "renewMargin",
                value: format!("{margin}s"),
                rule: "must be >= 1s",
            });
        }
        if margin >= duration {
            return Err(Error::Config {
                field: "renewMargin",
                value: format!("{margin}s"),
                rule: "must be < leaseDuration",
            });
        }
        if self.identity.is_empty() {
            return Err(Error::Config {
                field: "identity",
                value: String::new(),
                rule: "must not be empty",
            });
        }
        Ok(LeaseParams::new(self.identity.clone(), duration, margin)
            .with_field_manager(field_manager(&self.identity)))
    }
}

/// kube-lease-manager's own field manager name, `kube-lease-manager-<identity>`, when it fits
/// the 128 bytes the API server (and kube, before sending) takes. A longer identity (a pod name
/// with a DNS advertise address) keeps a prefix and a hash of the whole, still one per replica:
/// with the name as it was, every apply failed and the replica never led.
fn field_manager(identity: &str) -> String {
    const PREFIX: &str = "kube-lease-manager-";
    const MAX_BYTES: usize = 128;
    let whole = format!("{PREFIX}{identity}");
    if whole.len() <= MAX_BYTES {
        return whole;
    }
    // FNV-1a: stable across builds, so a restarted replica keeps its manager.
    let hash = identity.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut end = MAX_BYTES - PREFIX.len() - 17;
    while !identity.is_char_boundary(end) {
        end -= 1;
    }
    format!("{PREFIX}{}-{hash:016x}", &identity[..end])
}

/// A running election. Dropping it steps down in the background; [`LeaderElection::step_down`]
/// does so and waits for the release.
#[derive(Debug)]
pub struct LeaderElection {
    lease: String,
    is_leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

// === impl LeaderElection ===

impl LeaderElection {
    /// Create the Lease if needed and start competing for it.
    pub async fn start(client: kube::Client, config: &LeaseConfig) -> Result<Self, Error> {
        let params = config.params()?;
        let lease = format!("{}/{}", config.namespace, config.lease_name);
        let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&config.namespace)
            .with_parameters(params)
            .with_create_mode(LeaseCreateMode::AutoCreate)
            .build()
            .await
            .map_err(|source| Error::Lease {
                lease: lease.clone(),
                source,
            })?;
        let (tx, is_leader) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let claim = Claim {
            leases: Api::namespaced(client, &config.namespace),
            lease_name: config.lease_name.clone(),
            identity: config.identity.clone(),
            lease_duration: config.lease_duration,
            renew_margin: config.renew_margin,
            valid_until: None,
        };
        let task = tokio::spawn(run(manager, claim, tx, stop_rx, lease.clone()));
        Ok(Self {
            lease,
            is_leader,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// `true` while this instance holds the lease. Act only while it reads `true`, and stop as
    /// soon as it changes.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    /// Stop acting as leader, release the lease so another instance takes over without waiting
    /// for expiry, and wait for the release.
    pub async fn step_down(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(Error::ElectionTask {
                    lease: self.lease.clone(),
                    message: e.to_string(),
                })
            }),
            None => Ok(()),
        }
    }
}

/// This instance's claim on the Lease as last read from the API server.
struct Claim {
    leases: Api<Lease>,
    lease_name: String,
    identity: String,
    lease_duration: Duration,
    renew_margin: Duration,
    /// Until when the claim last seen is valid; `None` when we hold none.
    valid_until: Option<SystemTime>,
}

/// A read of the Lease, bounded by the check period (kube's client has no read timeout).
type LeaseRead = Pin<Box<dyn Future<Output = Result<kube::Result<Option<Lease>>, Elapsed>> + Send>>;

impl Claim {
    /// Starts reading the Lease. It runs beside the loop rather than inside it, so the cutoff
    /// ([`Self::firm_until`]) is kept however long the read takes.
    fn read(&self) -> LeaseRead {
        let (leases, name) = (self.leases.clone(), self.lease_name.clone());
        let bound = self.check_every();
        Box::pin(async move { tokio::time::timeout(bound, leases.get_opt(&name)).await })
    }

    /// Takes in what a read found. A failed or timed-out read changes nothing: the claim seen
    /// last stands until it is too close to lapsing.
    fn refresh(&mut self, read: Result<kube::Result<Option<Lease>>, Elapsed>) {
        match read {
            Ok(Ok(Some(lease))) => {
                let spec = lease.spec.unwrap_or_default();
                self.valid_until = match (
                    spec.holder_identity,
                    spec.renew_time,
                    spec.lease_duration_seconds,
                ) {
                    (Some(holder), Some(renewed), Some(seconds)) if holder == self.identity => {
                        let seconds = u64::try_from(seconds).unwrap_or(0);
                        Some(SystemTime::from(renewed.0) + Duration::from_secs(seconds))
                    }
                    _ => None,
                };
            }
            // A deleted Lease holds no claim, and once recreated anyone may take it at once.
            Ok(Ok(None)) => self.valid_until = None,
            Ok(Err(error)) => {
                tracing::debug!(lease = %self.lease_name, %error, "cannot read the lease");
            }
            Err(_elapsed) => {
                tracing::debug!(
                    lease = %self.lease_name,
                    timeout = ?self.check_every(),
                    "reading the lease timed out"
                );
            }
        }
    }

    /// Whether the claim has more than half the renew margin left: time for the loop to stop
    /// acting before another instance may take the lease.
    fn firm(&self, now: SystemTime) -> bool {
        self.firm_until().is_some_and(|until| now < until)
    }

    /// When the claim seen last stops being firm.
    fn firm_until(&self) -> Option<SystemTime> {
        self.valid_until
            .and_then(|until| until.checked_sub(self.renew_margin / 2))
    }

    fn check_every(&self) -> Duration {
        (self.renew_margin / 4).max(Duration::from_millis(100))
    }
}

/// Every `every`, recreates the Lease if it was deleted. Never returns; dropped with the loop.
async fn recreate_when_deleted(
    leases: Api<Lease>,
    lease_name: String,
    every: Duration,
) -> Infallible {
    // `build()` has just made sure the Lease exists.
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        // Bounded for the same reason as `Claim::refresh`: a hung call must not end the checks.
        if tokio::time::timeout(every, recreate_if_missing(&leases, &lease_name))
            .await
            .is_err()
        {
            tracing::debug!(lease = %lease_name, "checking that the lease exists timed out");
        }
    }
}

async fn recreate_if_missing(leases: &Api<Lease>, lease_name: &str) {
    match leases.get_opt(lease_name).await {
        Ok(Some(_)) => return,
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(lease = %lease_name, %error, "cannot read the lease");
            return;
        }
    }
    // As kube-lease-manager creates it: a name and no spec, so whoever syncs next may take it.
    let empty = Lease {
        metadata: ObjectMeta {
            name: Some(lease_name.to_string()),
            ..ObjectMeta::default()
        },
        spec: None,
    };
    match leases.create(&PostParams::default(), &empty).await {
        Ok(_) => tracing::info!(lease = %lease_name, "the lease was deleted; recreated it"),
        Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => {
            tracing::debug!(
                lease = %lease_name,
                "the lease was deleted; another instance recreated it"
            );
        }
        Err(error) => {
            tracing::warn!(
                lease = %lease_name, %error,
                "the lease was deleted and cannot be recreated"
            );
        }
    }
}

async fn run(
    manager: kube_lease_manager::LeaseManager,
    mut claim: Claim,
    tx: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
    lease: String,
) -> Result<(), Error> {
    let identity = claim.identity.clone();
    let recreate = recreate_when_deleted(
        claim.leases.clone(),
        claim.lease_name.clone(),
        claim.lease_duration,
    );
    tokio::pin!(recreate);
    let (mut held, manager_task) = manager.watch().await;
    let mut check = tokio::time::interval(claim.check_every());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holds = false;
    let mut reading: Option<LeaseRead> = None;
    loop {
        // The moment to stop acting, if the claim is firm now: kept by a timer, not by the next
        // read, which may hang for its whole bound and would then leave no margin at all.
        let cutoff = claim
            .firm_until()
            .and_then(|until| until.duration_since(SystemTime::now()).ok())
            .map(|left| tokio::time::Instant::now() + left);
        tokio::select! {
            // A send or a dropped `LeaderElection`: either way, step down.
            _ = &mut stop => break,
            changed = held.changed() => {
                if changed.is_err() {
                    // The manager's task ended on its own: we no longer know, so we do not lead.
                    tx.send_replace(false);
                    tracing::warn!(%lease, %identity, "lease manager stopped");
                    return finish(manager_task, &lease).await;
                }
                holds = *held.borrow_and_update();
                tracing::info!(%lease, %identity, leading = holds, "leadership changed");
                // Just taken (or lost): what the manager wrote is the claim, newer than any
                // read under way.
                claim.valid_until = holds.then(|| SystemTime::now() + claim.lease_duration);
                reading = None;
            }
            _ = check.tick(), if holds && reading.is_none() => reading = Some(claim.read()),
            read = read_done(&mut reading), if reading.is_some() => {
                reading = None;
                claim.refresh(read);
            }
            () = sleep_until_cutoff(cutoff), if cutoff.is_some() => {}
            never = &mut recreate => match never {},
        }
        let leading = holds && claim.firm(SystemTime::now());
        let was = *tx.borrow();
        if leading != was {
            if holds && !leading {
                tracing::warn!(
                    %lease, %identity,
                    "the lease has not been renewed in time; stopped acting until a renewal lands"
                );
            } else if holds {
                tracing::info!(%lease, %identity, "the lease is renewed again; acting");
            }
            tx.send_replace(leading);
        }
    }
    // Stop acting before giving the lease away, so two leaders never overlap.
    tx.send_replace(false);
    // Closing the channel makes the manager release the lease and return.
    drop(held);
    let result = finish(manager_task, &lease).await;
    tracing::info!(%lease, %identity, released = result.is_ok(), "stepped down");
    result
}

async fn read_done(
    reading: &mut Option<LeaseRead>,
) -> Result<kube::Result<Option<Lease>>, Elapsed> {
    match reading {
        Some(read) => read.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_cutoff(cutoff: Option<tokio::time::Instant>) {
    if let Some(at) = cutoff {
        tokio::time::sleep_until(at).await;
    }
}

async fn finish(
    task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
    lease: &str,
) -> Result<(), Error> {
    match task.await {
        Ok(Ok(_manager)) => Ok(()),
        Ok(Err(source)) => Err(Error::Lease {
            lease: lease.to_string(),
            source,
        }),
        Err(join) => Err(Error::ElectionTask {
            lease: lease.to_string(),
            message: join.to_string(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn config(duration: Duration, margin: Duration) -> LeaseConfig {
        LeaseConfig {
            lease_duration: duration,
            renew_margin: margin,
            ..LeaseConfig::new("ns", "flyball", "pod-a")
        }
    }

    #[test]
    fn default_timings_are_accepted() {
        assert!(LeaseConfig::new("ns", "flyball", "pod-a").params().is_ok());
    }

    #[test]
    fn timings_the_lease_crate_would_panic_on_are_refused() {
        let err = config(Duration::from_secs(5), Duration::from_secs(5))
            .params()
            .unwrap_err();
        assert_eq!(err.to_string(), "renewMargin = 5s: must be < leaseDuration");
        let err = config(Duration::from_secs(5), Duration::ZERO)
            .params()
            .unwrap_err();
        assert_eq!(err.to_string(), "renewMargin = 0s: must be >= 1s");
        let err = config(Duration::from_millis(2500), Duration::from_secs(1))
            .params()
            .unwrap_err();
        assert_eq!(err.metric_label(), "config");
    }

    #[test]
    fn field_managers_fit_the_api_and_stay_one_per_replica() {
        assert_eq!(
            field_manager("pod-0@10.0.0.7:9090"),
            "kube-lease-manager-pod-0@10.0.0.7:9090"
        );
        let long = |n: u32| {
            format!(
                "{}@flyball-control-{n}.flyball.svc.cluster.local:9090",
                "p".repeat(80)
            )
        };
        let (a, b) = (field_manager(&long(0)), field_manager(&long(1)));
        assert!(a.len() <= 128 && b.len() <= 128, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, field_manager(&long(0)));
        let wide = "é".repeat(100);
        assert!(field_manager(&wide).len() <= 128);
    }
}

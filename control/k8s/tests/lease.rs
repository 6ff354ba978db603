//! Leader election hand-over between two instances on one Lease.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use flyball_apiserver::{TestCluster, Verb};
use flyball_k8s::{LeaderElection, LeaseConfig};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use kube::core::ApiResource;
use serde_json::Value;
use support::WAIT;
use tokio::sync::watch;

/// The shortest timings the Lease API allows (whole seconds), so that the follower's wait for
/// the old claim to lapse stays near 2 s.
fn config(cluster: &TestCluster, lease: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(2),
        renew_margin: Duration::from_secs(1),
        ..LeaseConfig::new(cluster.namespace(), lease, identity)
    }
}

/// A Lease name of its own for one test, removed with the test's other objects.
fn tracked_lease(cluster: &TestCluster, prefix: &str) -> String {
    let name = cluster.unique_name(prefix);
    cluster.track(
        ApiResource::erase::<Lease>(&()),
        Some(cluster.namespace().to_string()),
        name.clone(),
    );
    name
}

fn lease_path(cluster: &TestCluster, lease_name: &str) -> String {
    format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{lease_name}",
        cluster.namespace()
    )
}

/// The Lease's last renewal as stored, read without a call (a GET would meet injected faults).
fn stored_renew_time(
    fake: &flyball_apiserver::ApiServer,
    cluster: &TestCluster,
    lease_name: &str,
) -> std::time::SystemTime {
    let stored = fake
        .object(
            "coordination.k8s.io/v1",
            "Lease",
            cluster.namespace(),
            lease_name,
        )
        .unwrap();
    let spec = serde_json::from_value::<Lease>(stored)
        .unwrap()
        .spec
        .unwrap();
    std::time::SystemTime::from(spec.renew_time.unwrap().0)
}

/// Starts an election for `identity` on `lease_name` and waits until it leads.
async fn leading(cluster: &TestCluster, lease_name: &str, identity: &str) -> LeaderElection {
    let election = LeaderElection::start(cluster.client(), &config(cluster, lease_name, identity))
        .await
        .unwrap();
    until_leading(&mut election.is_leader(), identity).await;
    election
}

async fn until_leading(rx: &mut watch::Receiver<bool>, who: &str) {
    tokio::time::timeout(WAIT, rx.wait_for(|leading| *leading))
        .await
        .unwrap_or_else(|_| panic!("{who} did not become leader within {WAIT:?}"))
        .unwrap();
}

#[tokio::test]
async fn leadership_passes_to_the_second_instance_when_the_first_steps_down() {
    let cluster = TestCluster::start().await.unwrap();
    let lease_name = tracked_lease(&cluster, "flyball-leader");

    let a = leading(&cluster, &lease_name, "a").await;
    let a_leads = a.is_leader();

    let b = LeaderElection::start(cluster.client(), &config(&cluster, &lease_name, "b"))
        .await
        .unwrap();
    let mut b_leads = b.is_leader();

    a.step_down().await.unwrap();
    assert!(
        !*a_leads.borrow(),
        "a still claims leadership after stepping down"
    );
    until_leading(&mut b_leads, "b").await;

    let lease = Api::<Lease>::namespaced(cluster.client(), cluster.namespace())
        .get(&lease_name)
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(2));

    if let Some(fake) = cluster.fake() {
        let path = lease_path(&cluster, &lease_name);
        let reqs = fake.requests();
        let on_lease: Vec<_> = reqs.iter().filter(|r| r.path == path).collect();
        let holder = |r: &flyball_apiserver::RecordedRequest| {
            r.body
                .as_ref()
                .and_then(|b| b.pointer("/spec/holderIdentity"))
                .cloned()
        };
        let is_apply = |r: &&&flyball_apiserver::RecordedRequest| {
            r.content_type.as_deref() == Some("application/apply-patch+yaml")
        };
        // a takes the free lease with a server-side apply, as its own field manager.
        let a_takes = on_lease
            .iter()
            .position(|r| is_apply(&r) && holder(r) == Some(Value::from("a")))
            .expect("a's apply");
        assert_eq!(
            on_lease[a_takes].query_param("fieldManager").as_deref(),
            Some("kube-lease-manager-a")
        );
        assert_eq!(on_lease[a_takes].status, Some(200));
        // a releases with a strategic patch that clears the holder.
        let a_releases = on_lease
            .iter()
            .position(|r| {
                r.content_type.as_deref() == Some("application/strategic-merge-patch+json")
                    && holder(r) == Some(Value::Null)
            })
            .expect("a's release");
        // b takes over with its own apply, after the release, and it succeeds.
        let b_takes = on_lease
            .iter()
            .position(|r| {
                is_apply(&r) && holder(r) == Some(Value::from("b")) && r.status == Some(200)
            })
            .expect("b's successful apply");
        assert!(a_takes < a_releases && a_releases < b_takes);
        assert_eq!(
            on_lease[b_takes].query_param("fieldManager").as_deref(),
            Some("kube-lease-manager-b")
        );
        // The lease was created exactly once.
        let creates = reqs.iter().filter(|r| r.method == "POST").count();
        assert_eq!(creates, 1);
    }

    b.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// b's first attempt to take the Lease a gave up is answered 409 Conflict (another writer won
/// the race, as the API server answers a stale write): b does not lead on it, tries again, and
/// leads once a write of its own lands. Needs an injected conflict: skipped on a real cluster
/// (`of_two_instances_started_together_only_the_lease_holder_leads` races there for real).
#[tokio::test]
async fn a_conflict_when_taking_the_lease_is_retried_and_leads_only_once_a_write_lands() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake() else {
        eprintln!("skipped: injecting a Lease conflict needs the in-process API server");
        return;
    };
    let lease_name = tracked_lease(&cluster, "flyball-conflict");
    let path = lease_path(&cluster, &lease_name);
    let a = leading(&cluster, &lease_name, "a").await;
    let b = LeaderElection::start(cluster.client(), &config(&cluster, &lease_name, "b"))
        .await
        .unwrap();
    let mut b_leads = b.is_leader();
    a.step_down().await.unwrap();
    // b waits out a's claim (at least a second of it is left) before it looks again: the
    // conflict is in place for its first write.
    fake.clear_requests();
    fake.conflict_next(Some(Verb::Patch), &path, 1);
    until_leading(&mut b_leads, "b").await;

    let writes: Vec<(Option<u16>, Option<Value>)> = fake
        .requests()
        .iter()
        .filter(|r| r.path == path && r.method == "PATCH")
        .map(|r| {
            let holder = r
                .body
                .as_ref()
                .and_then(|b| b.pointer("/spec/holderIdentity"));
            (r.status, holder.cloned())
        })
        .collect();
    assert_eq!(
        writes.first(),
        Some(&(Some(409), Some(Value::from("b")))),
        "b's first write meets the conflict: {writes:?}"
    );
    assert!(
        writes[1..]
            .iter()
            .any(|w| *w == (Some(200), Some(Value::from("b")))),
        "and a later one lands: {writes:?}"
    );
    let lease = Api::<Lease>::namespaced(cluster.client(), cluster.namespace())
        .get(&lease_name)
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("b"));
    b.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

#[tokio::test]
async fn of_two_instances_started_together_only_the_lease_holder_leads() {
    let cluster = TestCluster::start().await.unwrap();
    let lease_name = tracked_lease(&cluster, "flyball-race");
    let (config_a, config_b) = (
        config(&cluster, &lease_name, "a"),
        config(&cluster, &lease_name, "b"),
    );
    let (a, b) = tokio::join!(
        LeaderElection::start(cluster.client(), &config_a),
        LeaderElection::start(cluster.client(), &config_b),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (mut a_leads, mut b_leads) = (a.is_leader(), b.is_leader());
    tokio::time::timeout(WAIT, async {
        tokio::select! {
            _ = a_leads.wait_for(|l| *l) => {}
            _ = b_leads.wait_for(|l| *l) => {}
        }
    })
    .await
    .expect("someone leads");
    let lease = Api::<Lease>::namespaced(cluster.client(), cluster.namespace())
        .get(&lease_name)
        .await
        .unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    // The one the Lease names leads; the other does not.
    assert_eq!(*a_leads.borrow(), holder == "a");
    assert_eq!(*b_leads.borrow(), holder == "b");
    a.step_down().await.unwrap();
    b.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A leader whose Lease calls fail stops acting before its claim lapses (another instance may
/// take the Lease then), and acts again once a renewal lands. Needs injected faults: skipped on
/// a real cluster.
#[tokio::test]
async fn a_leader_that_cannot_renew_stops_acting_before_its_claim_lapses() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake() else {
        eprintln!("skipped: injecting Lease faults needs the in-process API server");
        return;
    };
    let lease_name = tracked_lease(&cluster, "flyball-renew");
    let a = leading(&cluster, &lease_name, "a").await;
    let mut a_leads = a.is_leader();

    // Every Lease call answers 500 for a while: no renewal lands.
    let path = lease_path(&cluster, &lease_name);
    fake.clear_requests();
    fake.fail_next(None, &path, 30, 500);
    tokio::time::timeout(WAIT, a_leads.wait_for(|leading| !*leading))
        .await
        .expect("a stops acting while its renewals fail")
        .unwrap();
    let stopped_at = std::time::SystemTime::now();
    // No renewal landed, and it stopped before the claim it last renewed could lapse (as stored;
    // a GET now would meet the faults too).
    let log = fake.requests();
    assert!(
        log.iter().all(|r| r.path != path || r.status == Some(500)),
        "a renewal landed: {log:?}"
    );
    let renewed = stored_renew_time(fake, &cluster, &lease_name);
    assert!(
        stopped_at < renewed + Duration::from_secs(2),
        "a acted past its claim"
    );

    // The faults run out, a renewal lands, and a acts again. kube-lease-manager backs off after
    // each failed call, doubling up to 30 s, and how many failures it met depends on timing: wait
    // out its longest backoff.
    tokio::time::timeout(
        Duration::from_secs(45),
        a_leads.wait_for(|leading| *leading),
    )
    .await
    .expect("a leads again once a renewal lands after the faults")
    .unwrap();
    let lease = Api::<Lease>::namespaced(cluster.client(), cluster.namespace());
    assert_eq!(
        lease
            .get(&lease_name)
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("a")
    );
    a.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// A leader whose Lease reads hang (a half-open connection: kube's client has no read timeout)
/// and whose renewals fail stops acting before its claim lapses, and acts again once the calls
/// go through. Needs injected faults: skipped on a real cluster.
#[tokio::test]
async fn a_leader_whose_lease_reads_hang_stops_acting_before_its_claim_lapses() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake() else {
        eprintln!("skipped: holding Lease reads needs the in-process API server");
        return;
    };
    let lease_name = tracked_lease(&cluster, "flyball-hang");
    // A wide margin: a stops acting with at least 750 ms of its claim left (checks every
    // 750 ms, stops under 1.5 s), room enough for a busy 2-core machine to run the checks late.
    let wide_margin = LeaseConfig {
        lease_duration: Duration::from_secs(4),
        renew_margin: Duration::from_secs(3),
        ..LeaseConfig::new(cluster.namespace(), &lease_name, "a")
    };
    let a = LeaderElection::start(cluster.client(), &wide_margin)
        .await
        .unwrap();
    let mut a_leads = a.is_leader();
    until_leading(&mut a_leads, "a").await;

    // Reads are held longer than the 4 s claim; renewals answer 500.
    let path = lease_path(&cluster, &lease_name);
    fake.clear_requests();
    fake.stall_next(Some(Verb::Get), &path, 8, Duration::from_secs(5));
    fake.fail_next(Some(Verb::Patch), &path, 4, 500);
    tokio::time::timeout(WAIT, a_leads.wait_for(|leading| !*leading))
        .await
        .expect("a stops acting while its Lease reads hang")
        .unwrap();
    let stopped_at = std::time::SystemTime::now();
    let log = fake.requests();
    assert!(
        log.iter()
            .all(|r| r.path != path || r.method != "PATCH" || r.status == Some(500)),
        "a renewal landed: {log:?}"
    );
    let renewed = stored_renew_time(fake, &cluster, &lease_name);
    assert!(
        stopped_at < renewed + wide_margin.lease_duration,
        "a acted past its claim: stopped {:?} after it lapsed",
        stopped_at.duration_since(renewed + wide_margin.lease_duration)
    );

    // The faults run out and a acts again (the crate's backoff doubles up to 30 s).
    tokio::time::timeout(
        Duration::from_secs(45),
        a_leads.wait_for(|leading| *leading),
    )
    .await
    .expect("a leads again once its Lease calls go through")
    .unwrap();
    a.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// Deleting the Lease (the usual way to unstick an election) does not end leadership for good:
/// the Lease is recreated and one of the instances takes it.
#[tokio::test]
async fn after_the_lease_is_deleted_one_instance_leads_again() {
    let cluster = TestCluster::start().await.unwrap();
    let lease_name = tracked_lease(&cluster, "flyball-deleted");
    let a = leading(&cluster, &lease_name, "a").await;
    let b = LeaderElection::start(cluster.client(), &config(&cluster, &lease_name, "b"))
        .await
        .unwrap();
    let (mut a_leads, mut b_leads) = (a.is_leader(), b.is_leader());

    let leases = Api::<Lease>::namespaced(cluster.client(), cluster.namespace());
    leases
        .delete(&lease_name, &DeleteParams::default())
        .await
        .unwrap();
    // A Lease that is gone holds no claim: a stops acting.
    tokio::time::timeout(WAIT, a_leads.wait_for(|leading| !*leading))
        .await
        .expect("a stops acting once its Lease is gone")
        .unwrap();

    // The crate backs off after each 404, doubling up to 30 s: wait out its longest backoff.
    let someone_leads = async {
        tokio::select! {
            _ = a_leads.wait_for(|l| *l) => {}
            _ = b_leads.wait_for(|l| *l) => {}
        }
    };
    tokio::time::timeout(Duration::from_secs(45), someone_leads)
        .await
        .expect("someone leads again after the Lease was deleted");
    let holder = leases
        .get(&lease_name)
        .await
        .expect("the Lease exists again")
        .spec
        .and_then(|spec| spec.holder_identity)
        .expect("the recreated Lease has a holder");
    assert_eq!(*a_leads.borrow(), holder == "a");
    assert_eq!(*b_leads.borrow(), holder == "b");
    a.step_down().await.unwrap();
    b.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

/// The module's promise: a leader acts only while its claim has more than `renew_margin / 2`
/// left. One quick Lease read just before that cut-off, then reads that hang: the cut-off is a
/// timer, so the hung read does not delay it (it did, by its whole bound, to ~250 ms before the
/// lapse: a peer with its clock a little ahead could take the Lease while this one acted).
#[tokio::test]
async fn a_hung_lease_read_does_not_delay_the_cut_off() {
    let cluster = TestCluster::start().await.unwrap();
    let Some(fake) = cluster.fake() else {
        eprintln!("skipped: needs the in-process API server");
        return;
    };
    let lease_name = tracked_lease(&cluster, "flyball-onehang");
    let timings = LeaseConfig {
        lease_duration: Duration::from_secs(4),
        renew_margin: Duration::from_secs(3),
        ..LeaseConfig::new(cluster.namespace(), &lease_name, "a")
    };
    let a = LeaderElection::start(cluster.client(), &timings)
        .await
        .unwrap();
    let mut a_leads = a.is_leader();
    until_leading(&mut a_leads, "a").await;

    // No renewal lands from now on.
    let path = lease_path(&cluster, &lease_name);
    fake.fail_next(Some(Verb::Patch), &path, 1000, 500);
    let renewed = stored_renew_time(fake, &cluster, &lease_name);
    let lapses = renewed + timings.lease_duration;
    let lapses_at = std::time::Instant::now()
        + lapses
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
    // The last quick read while the claim is still firm (more than 1.5 s left)...
    let from = lapses_at - Duration::from_millis(2250);
    fake.clear_requests();
    fake.wait_for(
        |log| {
            log.iter()
                .any(|r| r.is("GET", &path) && r.status == Some(200) && r.received_at >= from)
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // ...then the next reads hang.
    fake.stall_next(Some(Verb::Get), &path, 3, Duration::from_secs(3));

    tokio::time::timeout(WAIT, a_leads.wait_for(|leading| !*leading))
        .await
        .unwrap()
        .unwrap();
    let left = lapses
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left >= timings.renew_margin / 4,
        "a stopped acting with only {left:?} of its claim left (promised: more than {:?}, \
         at least {:?} with the check period)",
        timings.renew_margin / 2,
        timings.renew_margin / 4
    );
    // The release is refused like the renewals (the faults outlast the test); the claim lapses.
    let _ = a.step_down().await;
    cluster.cleanup().await.unwrap();
}

/// The replica's identity is its Lease identity, `$POD_NAME@<advertise address>`: with a DNS
/// advertise address it runs past 110 bytes (the Events fix cuts `reportingInstance` to 128
/// bytes for just that case, and events_status.rs tests this very identity). kube-lease-manager
/// names its field manager `kube-lease-manager-<identity>`, and a `fieldManager` over 128 bytes
/// is refused: by kube's `PatchParams` validation before the request leaves (so no apply ever
/// reaches the API server), and by the API server itself (apimachinery's `ValidateFieldManager`,
/// 422). The election retries for good and the replica never leads: nothing is scaled, and no
/// Event is written either, long identity or not.
#[tokio::test]
async fn a_replica_with_a_long_lease_identity_still_takes_the_lease() {
    let cluster = TestCluster::start().await.unwrap();
    let lease_name = tracked_lease(&cluster, "flyball-leader");
    let identity = "llm-gateway-flyball-control-0@llm-gateway-flyball-control-0.\
                    llm-gateway-flyball-control-headless.inference-production.svc.cluster.local:9090";
    let election =
        LeaderElection::start(cluster.client(), &config(&cluster, &lease_name, identity))
            .await
            .unwrap();
    let mut leads = election.is_leader();
    let led = tokio::time::timeout(WAIT, leads.wait_for(|leading| *leading))
        .await
        .is_ok();
    let applies = cluster.fake().map(|fake| {
        let path = lease_path(&cluster, &lease_name);
        fake.requests()
            .iter()
            .filter(|r| r.path == path && r.method == "PATCH")
            .count()
    });
    assert!(
        led,
        "a replica whose identity is {} bytes did not take a free Lease within {WAIT:?} \
         ({applies:?} patches reached the Lease; its field manager \
         \"kube-lease-manager-<identity>\" is {} bytes, over the 128 the API takes)",
        identity.len(),
        "kube-lease-manager-".len() + identity.len()
    );
    election.step_down().await.unwrap();
    cluster.cleanup().await.unwrap();
}

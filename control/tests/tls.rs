//! TLS on the gRPC port over real loopback connections, with the test certificates in
//! `tests/tls` (see its `generate.sh`): reports land only over mutual TLS with a certificate
//! from the configured CA, followers forward to the leader over the same, and renewed
//! certificates serve new connections without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::PathBuf;
use std::time::Duration;

use flyball_control::leader::Leadership;
use flyball_proto::grpc::telemetry_service_client::TelemetryServiceClient;
use flyball_proto::v1;
use support::{Error, ONE_POOL, report};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const WAIT: Duration = Duration::from_secs(10);

fn file(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "tls", name]
        .iter()
        .collect();
    path.to_str().unwrap().to_owned()
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(file(name)).unwrap()
}

/// The flags of a replica with mutual TLS.
fn tls_flags() -> Vec<String> {
    [
        ("--grpc-tls-cert", "replica.crt"),
        ("--grpc-tls-key", "replica.key"),
        ("--grpc-tls-ca", "ca.crt"),
    ]
    .iter()
    .flat_map(|(flag, name)| [(*flag).to_owned(), file(name)])
    .collect()
}

/// A client of `control` that trusts the CA in `trust` and presents `client` (a certificate
/// and key in `tests/tls`, or none).
async fn connect(
    control: &support::Running,
    trust: &str,
    client: Option<&str>,
) -> Result<TelemetryServiceClient<Channel>, Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(trust)))
        .domain_name("flyball-control");
    if let Some(name) = client {
        tls = tls.identity(Identity::from_pem(
            pem(&format!("{name}.crt")),
            pem(&format!("{name}.key")),
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", control.grpc))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(TelemetryServiceClient::new(channel))
}

/// Sends one report over TLS as `client`, trusting `ca.crt`.
async fn send_over_tls(
    control: &support::Running,
    client: Option<&str>,
) -> Result<v1::ReportResponse, Error> {
    let mut grpc = connect(control, "ca.crt", client).await?;
    Ok(grpc.report(report("gw", 1, 1)).await?.into_inner())
}

#[tokio::test]
async fn reports_land_only_over_mutual_tls_with_a_certificate_from_the_ca() -> Result<(), Error> {
    let flags = tls_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = support::start(ONE_POOL, &flags).await?;

    // Plaintext, no client certificate, or one from another CA: nothing lands.
    let plaintext = TelemetryServiceClient::connect(control.grpc_uri()).await;
    let refused = match plaintext {
        Ok(mut grpc) => grpc.report(report("gw", 1, 1)).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext report was taken");
    assert!(send_over_tls(&control, None).await.is_err());
    assert!(send_over_tls(&control, Some("rogue")).await.is_err());
    assert_eq!(
        control.metric("flyball_ingest_reports_total").await?,
        Some(0.0)
    );
    // Each refusal is counted: operators see a gateway with the wrong certificate.
    let failures =
        |reason| format!("flyball_grpc_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    control
        .wait_metric(&failures("certificate"), 2.0, WAIT)
        .await?;
    control
        .wait_metric(&failures("protocol"), 1.0, WAIT)
        .await?;

    let ack = send_over_tls(&control, Some("replica")).await?;
    assert_eq!(ack.acknowledged_sequence, 1);
    assert_eq!(totals(&control).await?, 2);
    // What an expiry alert reads: replica.crt's notAfter (`openssl x509 -noout -enddate`).
    assert_eq!(
        control
            .metric(r#"flyball_grpc_tls_certificate_expiration_timestamp_seconds{file="cert"}"#)
            .await?,
        Some(4_949_170_715.0)
    );
    control.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_forward_to_and_follow_the_leader_over_mutual_tls() -> Result<(), Error> {
    let flags = tls_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let leader = support::bind(ONE_POOL, &flags).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (_a_leading, a_leading) = watch::channel(true);
    let (_a_leader, a_leader) = watch::channel(None);
    let leader = support::spawn(
        leader.with_leadership(Leadership::from_channels("a", a_leading, a_leader)),
    )?;
    let (_b_leading, b_leading) = watch::channel(false);
    let (_b_leader, b_leader) = watch::channel(Some(leader_uri));
    let follower = support::start_led(
        ONE_POOL,
        &flags,
        Leadership::from_channels("b", b_leading, b_leader),
    )
    .await?;

    // The follower follows the leader over the same mutual TLS.
    leader
        .wait_metric("flyball_replication_followers", 1.0, WAIT)
        .await?;
    send_over_tls(&follower, Some("replica")).await?;
    follower
        .wait_metric("flyball_forward_reports_total", 1.0, WAIT)
        .await?;
    assert_eq!(totals(&leader).await?, 2);
    // And the leader's own gateways' reports come back to it.
    let mut grpc = connect(&leader, "ca.crt", Some("replica")).await?;
    grpc.report(report("gw-at-the-leader", 1, 1)).await?;
    follower
        .wait_metric("flyball_replication_followed_total", 1.0, WAIT)
        .await?;
    assert_eq!(totals(&follower).await?, 4);
    leader.stop().await?;
    follower.stop().await
}

#[tokio::test]
async fn tls_flags_that_cannot_work_stop_the_start_naming_the_flag() {
    let cert = file("replica.crt");
    let start = |extra: Vec<String>| async move {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        support::start(ONE_POOL, &extra)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        start(vec!["--grpc-tls-cert".into(), cert.clone()]).await,
        "--grpc-tls-key is required with --grpc-tls-cert"
    );
    // A certificate and a key that do not belong together.
    let mismatched = start(vec![
        "--grpc-tls-cert".into(),
        cert.clone(),
        "--grpc-tls-key".into(),
        file("rogue.key"),
    ])
    .await;
    assert!(
        mismatched.starts_with(&format!("--grpc-tls-cert = {cert}: with --grpc-tls-key")),
        "{mismatched}"
    );
    assert_eq!(
        start(vec!["--grpc-tls-reload-every".into(), "0s".into()]).await,
        "--grpc-tls-reload-every = 0: must be above 0"
    );
}

#[tokio::test]
async fn renewed_certificates_serve_new_connections_without_a_restart() -> Result<(), Error> {
    let secret = support::MountedSecret::new("tls-renewal")?;
    let mount = |from: &str, to: &str| secret.mount(from, to);
    let flags = secret.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = support::start(ONE_POOL, &flags).await?;
    let mut before = connect(&control, "ca.crt", Some("replica")).await?;
    before.report(report("before", 1, 1)).await?;

    // Renewed: a new certificate from a new CA. A certificate without its key first, as a
    // careless copy would leave them: refused, and the old pair still serves.
    mount("next.crt", "tls.crt")?;
    control
        .wait_metric(
            r#"flyball_grpc_tls_reloads_total{result="failed"}"#,
            1.0,
            WAIT,
        )
        .await?;
    let mut old = connect(&control, "ca.crt", Some("replica")).await?;
    old.report(report("old", 1, 1)).await?;
    mount("next.key", "tls.key")?;
    mount("next-ca.crt", "ca.crt")?;
    control
        .wait_metric(
            r#"flyball_grpc_tls_reloads_total{result="applied"}"#,
            1.0,
            WAIT,
        )
        .await?;

    // New connections: the server presents the new certificate, and wants client certificates
    // from the new CA.
    assert!(connect(&control, "ca.crt", Some("replica")).await.is_err());
    let mut stale_client = connect(&control, "next-ca.crt", Some("replica")).await;
    if let Ok(grpc) = &mut stale_client {
        // TLS 1.3 reports a refused client certificate only on the first read.
        assert!(grpc.report(report("stale", 1, 1)).await.is_err());
    }
    let mut renewed = connect(&control, "next-ca.crt", Some("next")).await?;
    renewed.report(report("renewed", 1, 1)).await?;
    // A connection made before keeps its session.
    before.report(report("before", 2, 1)).await?;

    assert_eq!(totals(&control).await?, 4 * 2);
    assert_eq!(
        control
            .metric(r#"flyball_grpc_tls_handshake_failures_total{reason="certificate"}"#)
            .await?,
        Some(1.0),
        "the old client certificate, refused by the new CA"
    );
    assert_eq!(
        control
            .metric(r#"flyball_grpc_tls_reloads_total{result="applied"}"#)
            .await?,
        Some(1.0)
    );
    control.stop().await?;
    std::fs::remove_dir_all(&secret.dir)?;
    Ok(())
}

async fn totals(control: &support::Running) -> Result<u64, Error> {
    let pools = control.pools().await?;
    Ok(pools["pools"][0]["requests"].as_u64().unwrap())
}

/// Every `flyball_grpc_tls_handshake_failures_total` sample, by its `reason`.
async fn handshake_failures(control: &support::Running) -> Result<Vec<(String, f64)>, Error> {
    let (_, text) = control.get("/metrics").await?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("flyball_grpc_tls_handshake_failures_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// Waits until handshake failures total at least `n`, whatever their reason.
async fn wait_handshake_failures(
    control: &support::Running,
    n: f64,
) -> Result<Vec<(String, f64)>, Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let failures = handshake_failures(control).await?;
        if failures.iter().map(|(_, v)| v).sum::<f64>() >= n {
            return Ok(failures);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("handshake failures {failures:?} after {WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `protocol` is documented as "not TLS" (README) or "not TLS, or nothing in common": what an
/// operator reads as something plaintext knocking at the port. A client that speaks TLS
/// perfectly well but refuses this server's certificate (it expired while renewal stalled, it
/// is from a CA the client does not trust yet after a CA rotation, it lacks the name a
/// follower checks) sends a `bad_certificate`/`unknown_ca` alert, which is counted as
/// `protocol` too: the certificate problem the metric exists to surface is reported as the one
/// cause it is not.
#[tokio::test]
async fn a_client_refusing_the_servers_certificate_is_not_counted_as_not_tls() -> Result<(), Error>
{
    let flags = tls_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let control = support::start(ONE_POOL, &flags).await?;

    // A gateway that trusts only the next CA: it refuses replica.crt, from the current one.
    let refused = connect(&control, "next-ca.crt", Some("replica")).await;
    assert!(
        refused.is_err(),
        "the client took a certificate it does not trust"
    );
    let failures = wait_handshake_failures(&control, 1.0).await?;
    assert!(
        !failures.iter().any(|(reason, _)| reason == "protocol"),
        "a TLS client that refused the server's certificate was counted as {failures:?}"
    );
    control.stop().await
}

/// A follower that cannot complete its TLS handshake with the leader (here it checks a name the
/// leader's certificate lacks; as well a leader whose certificate expired, or a CA rotated on
/// one side first) opens a new connection, with a full TCP + TLS handshake, for every report
/// it takes: nothing paces it. A follower carrying a thousand gateways at 10 reports a second
/// turns a certificate mistake into ten thousand handshakes a second at the leader, for as long
/// as it lasts. When no reports arrive the lane retries every 500 ms (`RETRY_EVERY`); reports
/// arriving should not retry faster than that, or a backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_tls_handshake_with_the_leader_fails_does_not_reconnect_per_report()
-> Result<(), Error> {
    let flags = tls_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let leader = support::bind(ONE_POOL, &flags).await?;
    let leader_uri = format!("http://{}", leader.grpc_addr().unwrap());
    let (_a_leading, a_leading) = watch::channel(true);
    let (_a_leader, a_leader) = watch::channel(None);
    let leader = support::spawn(
        leader.with_leadership(Leadership::from_channels("a", a_leading, a_leader)),
    )?;
    let mut follower_flags = flags.clone();
    follower_flags.extend(["--grpc-tls-server-name", "not-in-the-certificate"]);
    let (_b_leading, b_leading) = watch::channel(false);
    let (_b_leader, b_leader) = watch::channel(Some(leader_uri));
    let follower = support::start_led(
        ONE_POOL,
        &follower_flags,
        Leadership::from_channels("b", b_leading, b_leader),
    )
    .await?;

    // One gateway (so one forwarding lane) reports 100 times.
    let started = tokio::time::Instant::now();
    let mut grpc = connect(&follower, "ca.crt", Some("replica")).await?;
    for sequence in 1..=100 {
        grpc.report(report("gw", sequence, 1)).await?;
    }
    // The first attempt has failed by now.
    wait_handshake_failures(&leader, 1.0).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let elapsed = started.elapsed();
    let failures = handshake_failures(&leader).await?;
    let attempts: f64 = failures.iter().map(|(_, v)| v).sum();
    // Generous: every lane retrying every 500 ms from the start, plus one.
    let paced = (flyball_control::forward::LANES as f64) * (elapsed.as_secs_f64() / 0.5 + 1.0);
    assert!(
        attempts <= paced,
        "{attempts} handshakes at the leader in {elapsed:?} for 100 reports ({failures:?}); \
         paced retries would be at most {paced:.0}"
    );
    assert_eq!(
        follower.metric("flyball_forward_reports_total").await?,
        Some(0.0)
    );
    leader.stop().await?;
    follower.stop().await
}

//! The same test against the fake or a real cluster.
//!
//! With `KUBECONFIG` set, tests talk to that cluster through `kube::Client::try_default()`,
//! in the namespace `FLYBALL_TEST_NAMESPACE` (default: the kubeconfig's namespace), creating
//! objects with unique names labelled `flyball.dev/test-run=<id>` and deleting them in
//! [`TestCluster::cleanup`]. Otherwise they start an [`ApiServer`].

use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{ApiServer, Error};

/// Label put on everything a test creates, so a failed run can be cleaned up by hand:
/// `kubectl delete deploy,sts,hpa,lease -l flyball.dev/test-run`.
pub const RUN_LABEL: &str = "flyball.dev/test-run";

pub struct TestCluster {
    client: kube::Client,
    namespace: String,
    fake: Option<ApiServer>,
    run_id: String,
    counter: AtomicU32,
    created: Mutex<Vec<(ApiResource, Option<String>, String)>>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("namespace", &self.namespace)
            .field("fake", &self.fake)
            .field("run_id", &self.run_id)
            .finish()
    }
}

// === impl TestCluster ===

impl TestCluster {
    /// The cluster from `KUBECONFIG` if set, else a fresh fake. Prints which.
    pub async fn start() -> Result<Self, Error> {
        let run_id = format!("{:06x}", RandomState::new().hash_one(0u8) & 0xff_ffff);
        if std::env::var_os("KUBECONFIG").is_some() {
            let client = kube::Client::try_default()
                .await
                .map_err(Error::Kubeconfig)?;
            let namespace = std::env::var("FLYBALL_TEST_NAMESPACE")
                .unwrap_or_else(|_| client.default_namespace().to_string());
            println!("using the cluster from KUBECONFIG (namespace {namespace}, run {run_id})");
            return Ok(Self {
                client,
                namespace,
                fake: None,
                run_id,
                counter: AtomicU32::new(0),
                created: Mutex::new(Vec::new()),
            });
        }
        let fake = ApiServer::start().await?;
        println!("using in-process API server (KUBECONFIG not set)");
        Ok(Self {
            client: fake.client(),
            namespace: "default".into(),
            fake: Some(fake),
            run_id,
            counter: AtomicU32::new(0),
            created: Mutex::new(Vec::new()),
        })
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The namespace tests create their objects in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The fake, when this is not a real cluster.
    pub fn fake(&self) -> Option<&ApiServer> {
        self.fake.as_ref()
    }

    /// The fake, or `None` after printing that `test` is skipped on a real cluster because it
    /// needs `what` (fault injection, the request log, ...).
    pub fn fake_or_skip(&self, test: &str, what: &str) -> Option<&ApiServer> {
        if self.fake.is_none() {
            println!(
                "skipping {test} on a real cluster: it needs {what} from the in-process API server"
            );
        }
        self.fake.as_ref()
    }

    /// `prefix-<run>-<n>`: unique across runs and within this one.
    pub fn unique_name(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{n}", self.run_id)
    }

    /// Create `object` in the test namespace (labelled with the run), remembering it for
    /// [`TestCluster::cleanup`].
    pub async fn create<K>(&self, object: &K) -> Result<K, Error>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let mut object = object.clone();
        object
            .meta_mut()
            .labels
            .get_or_insert_with(Default::default)
            .insert(RUN_LABEL.to_string(), self.run_id.clone());
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .map_err(Error::Api)?;
        let name = created.meta().name.clone().unwrap_or_default();
        self.track(
            ApiResource::erase::<K>(&()),
            Some(self.namespace.clone()),
            name,
        );
        Ok(created)
    }

    /// Remember an object created some other way, for cleanup.
    pub fn track(&self, resource: ApiResource, namespace: Option<String>, name: String) {
        self.created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((resource, namespace, name));
    }

    /// A Deployment `name` (label `app: name`, one pause container) with `replicas`.
    pub async fn create_deployment(&self, name: &str, replicas: i32) -> Result<Deployment, Error> {
        let d: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}]}
                }
            }
        }))
        .map_err(|e| Error::Rejected {
            code: 0,
            reason: "Invalid".into(),
            message: e.to_string(),
        })?;
        self.create(&d).await
    }

    /// A StatefulSet, as [`TestCluster::create_deployment`].
    pub async fn create_statefulset(
        &self,
        name: &str,
        replicas: i32,
    ) -> Result<StatefulSet, Error> {
        let s: StatefulSet = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "server", "image": "registry.k8s.io/pause:3.10"}]}
                }
            }
        }))
        .map_err(|e| Error::Rejected {
            code: 0,
            reason: "Invalid".into(),
            message: e.to_string(),
        })?;
        self.create(&s).await
    }

    /// Install `crd` unless a CRD of that name exists, and wait until it is Established.
    /// CRDs are not removed by cleanup: other tests and runs share them.
    pub async fn ensure_crd(&self, crd: &CustomResourceDefinition) -> Result<(), Error> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::Api(e)),
        }
        let established = kube::runtime::wait::conditions::is_crd_established();
        let current = api.get_opt(&name).await.map_err(Error::Api)?;
        if kube::runtime::wait::Condition::matches_object(&established, current.as_ref()) {
            return Ok(());
        }
        // Only a real cluster gets here (the fake establishes CRDs as it stores them), so
        // watching is fine.
        let wait = kube::runtime::wait::await_condition(api, &name, established);
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Timeout(format!("CRD {name} to be established: {e}"))),
            Err(_) => Err(Error::Timeout(format!("CRD {name} to be established"))),
        }
    }

    /// Delete everything created through this cluster handle. Not-found is fine.
    pub async fn cleanup(&self) -> Result<(), Error> {
        let created = std::mem::take(
            &mut *self
                .created
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (ar, namespace, name) in created.into_iter().rev() {
            let api: Api<DynamicObject> = match &namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Api(e)),
            }
        }
        Ok(())
    }
}

//! A whole pgshift: the proxy, the controller that steers it and the admin socket, started
//! and stopped together. `pgshift run` is this plus signals; tests embed it.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::admin::server::AdminServer;
use crate::config::Config;
use crate::controller::store::{FileStore, MemoryStore, StateStore};
use crate::controller::{Controller, ControllerHandle, StateSource, initial_state};
use crate::proxy::{Proxy, ProxyOptions};
use crate::telemetry::{self, MetricsServer};

/// Options for [`Server::start`].
#[derive(Default)]
pub struct ServerOptions {
    /// Discard the saved state and start from the config (`run --reset-state`).
    pub reset_state: bool,
    pub proxy: ProxyOptions,
    /// The controller's state store, in place of the one the config asks for
    /// ([`state_store`]): for embedders with a store of their own, and for tests that inject
    /// store failures.
    pub store: Option<Box<dyn StateStore>>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("reset_state", &self.reset_state)
            .field("proxy", &self.proxy)
            .field("store", &self.store.as_ref().map(|store| store.describe()))
            .finish()
    }
}

/// A running pgshift.
pub struct Server {
    proxy: Proxy,
    controller: ControllerHandle,
    controller_task: tokio::task::JoinHandle<()>,
    admin: AdminServer,
    metrics: Option<MetricsServer>,
}

/// The state store a config asks for.
pub fn state_store(config: &Config) -> Box<dyn StateStore> {
    match &config.rollout.state_file {
        Some(path) => Box::new(FileStore::new(path.clone())),
        None => Box::new(MemoryStore::default()),
    }
}

impl Server {
    /// Starts everything `config` (loaded from `config_path`) describes.
    pub async fn start(
        config: Config,
        config_path: PathBuf,
        mut options: ServerOptions,
    ) -> anyhow::Result<Server> {
        let mut store = match options.store.take() {
            Some(store) => store,
            None => state_store(&config),
        };
        let (state, source) = initial_state(&config, store.as_mut(), options.reset_state)?;
        match &source {
            StateSource::Store(path) => tracing::info!(
                state_file = %path,
                green_weight = f64::from(state.green_weight_bp) / 100.0,
                state = state.rollout.as_str(),
                "routing state restored from the state file (it wins over [routing] green_weight)"
            ),
            StateSource::Config if options.reset_state => tracing::info!(
                green_weight = f64::from(state.green_weight_bp) / 100.0,
                "--reset-state: saved state discarded, starting from [routing] green_weight"
            ),
            StateSource::Config => tracing::info!(
                green_weight = f64::from(state.green_weight_bp) / 100.0,
                "no saved state: starting from [routing] green_weight"
            ),
        }
        options.proxy.initial_table = Some(state.routing_table(&config));
        // Before anything records a metric: values recorded earlier would be lost.
        telemetry::prometheus_handle();
        let admin_config = config.admin.clone();
        let metrics_addr = config.metrics.addr.clone();
        let proxy = Proxy::start(config, options.proxy).await?;
        let (controller, controller_task) =
            Controller::spawn(proxy.shared().clone(), store, state, config_path);
        let admin = match AdminServer::start(&admin_config, controller.clone()).await {
            Ok(admin) => admin,
            Err(error) => {
                proxy.shutdown().await;
                return Err(error).context("cannot open the admin socket ([admin] socket)");
            }
        };
        let metrics = match &metrics_addr {
            None => None,
            Some(addr) => match MetricsServer::start(addr, proxy.shared().clone()).await {
                Ok(metrics) => Some(metrics),
                Err(error) => {
                    admin.shutdown().await;
                    proxy.shutdown().await;
                    return Err(error);
                }
            },
        };
        Ok(Server {
            proxy,
            controller,
            controller_task,
            admin,
            metrics,
        })
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    pub fn controller(&self) -> &ControllerHandle {
        &self.controller
    }

    pub fn admin_socket(&self) -> &std::path::Path {
        self.admin.path()
    }

    /// Where `/metrics` and `/healthz` are served, when `[metrics] addr` is set.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Graceful shutdown: the admin socket closes, then the proxy drains its sessions (while
    /// `/healthz` answers 503), then the metrics listener closes.
    pub async fn shutdown(self) {
        self.admin.shutdown().await;
        self.proxy.shutdown().await;
        if let Some(metrics) = self.metrics {
            metrics.shutdown().await;
        }
        drop(self.controller);
        self.controller_task.abort();
    }
}

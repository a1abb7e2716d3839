//! Stand-in with the coordinator's test-facing interface that runs the real etcd 3.4 instead, so
//! the integration suite in `../it` can be checked against etcd itself (see README.md).
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(clap::Parser, Debug, Clone)]
pub struct Config {
    #[arg(long, default_value = "default")]
    pub name: String,
    #[arg(long, default_value = "default.etcd")]
    pub data_dir: String,
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub listen_client_urls: String,
    #[arg(long)]
    pub advertise_client_urls: Option<String>,
    #[arg(long)]
    pub listen_peer_urls: Option<String>,
    #[arg(long)]
    pub initial_advertise_peer_urls: Option<String>,
    #[arg(long)]
    pub initial_cluster: Option<String>,
    #[arg(long)]
    pub initial_cluster_state: Option<String>,
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    #[arg(long, default_value_t = 1572864)]
    pub max_request_bytes: u64,
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: u64,
    #[arg(long)]
    pub max_watchers_per_stream: Option<u64>,
    #[arg(long)]
    pub quota_backend_bytes: Option<u64>,
    #[arg(long)]
    pub log_format: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn url_with_port(url: &str) -> (String, SocketAddr) {
    let hostport = url.trim_start_matches("http://");
    let mut addr: SocketAddr = hostport.parse().expect("url");
    if addr.port() == 0 {
        addr.set_port(free_port());
    }
    (format!("http://{addr}"), addr)
}

impl Config {
    pub fn etcd_args(&self) -> (Vec<String>, SocketAddr, SocketAddr) {
        let (client, caddr) = url_with_port(&self.listen_client_urls);
        let (metrics, maddr) =
            url_with_port(self.listen_metrics_urls.as_deref().unwrap_or("http://127.0.0.1:0"));
        let peer = format!("http://127.0.0.1:{}", free_port());
        let args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}={peer}", self.name),
            format!("--listen-metrics-urls={metrics}"),
            format!("--max-request-bytes={}", self.max_request_bytes),
            format!("--max-txn-ops={}", self.max_txn_ops),
            "--log-level=error".to_string(),
            "--logger=zap".to_string(),
        ];
        (args, caddr, maddr)
    }
}

pub struct Running {
    child: std::process::Child,
    client: SocketAddr,
    metrics: SocketAddr,
}

impl Running {
    pub fn client_addr(&self) -> SocketAddr {
        self.client
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }
    pub async fn shutdown(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    let (args, client, metrics) = config.etcd_args();
    let child = std::process::Command::new("/usr/bin/etcd")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(client).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "etcd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait until it has a leader: a put succeeds.
    loop {
        anyhow::ensure!(Instant::now() < deadline, "etcd has no leader");
        if let Ok(mut kv) =
            proto::etcdserverpb::kv_client::KvClient::connect(format!("http://{client}")).await
        {
            if kv
                .range(proto::etcdserverpb::RangeRequest { key: b"x".to_vec(), ..Default::default() })
                .await
                .is_ok()
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Running { child, client, metrics })
}

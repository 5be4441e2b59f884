//! `keyshard lab up`: a CA and TLS certificates, the CMS's signing key, a client key pair, one
//! swtpm per shard host and one for the instance (each manufactured with EK certificates from a
//! local CA in the lab directory), `keyshard cms --ek-ca` on redb in the directory or on an etcd
//! it starts, `keyshard shard-host` x N in 3 regions x 2 operators, the instance enrolled
//! (`keyshard instance enroll`), and `lab.json`. Every process runs detached with its output in
//! `DIR/logs/`; a failed `up` stops what it started.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use keyshard_core::files;

use crate::error::{LabError, Result, io_context};
use crate::labfile::{self, Client, Cms, Etcd, Host, Instance, LAB_FILE, Lab};
use crate::pki;
use crate::process::{self, Liveness, Spawned, run_tool, wait_for_lines};
use crate::swtpm;

/// The regions the hosts are spread over, in turn.
pub const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// The operators the hosts are spread over, in turn.
pub const OPERATORS: [&str; 2] = ["acme", "globex"];
/// The most shard hosts a lab starts.
pub const MAX_HOSTS: u8 = 32;
/// The instance's id.
pub const INSTANCE_ID: &str = "instance-1";

/// The CMS's ready line, up to its address.
const CMS_READY: &str = "ready: cms listening on https://";
/// A shard host's ready line, up to its id.
const HOST_READY: &str = "ready: shard host ";
/// How long a swtpm may take to listen.
const SWTPM_READY: Duration = Duration::from_secs(10);
/// How long etcd may take to elect itself and answer /health.
const ETCD_READY: Duration = Duration::from_secs(30);
/// How long the CMS may take to listen.
const CMS_READY_LIMIT: Duration = Duration::from_secs(60);
/// How long the shard hosts may take, together, to enrol, register and serve.
const HOSTS_READY: Duration = Duration::from_secs(180);
/// How long `instance enroll` may take.
const ENROL_LIMIT: Duration = Duration::from_secs(120);
/// How long a key generation may take.
const KEYGEN_LIMIT: Duration = Duration::from_secs(30);
/// The grace period for what a failed `up` stops.
const FAILED_UP_GRACE: Duration = Duration::from_secs(5);
/// Attempts at a free port pair for a swtpm.
const SWTPM_PORT_ATTEMPTS: u32 = 8;

/// The CMS's store in a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// redb in `DIR/cms/cms.redb`.
    Redb,
    /// An etcd the lab starts on loopback, its data in `DIR/etcd/`.
    Etcd,
}

/// A validated `lab up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub dir: PathBuf,
    pub hosts: u8,
    pub store: StoreKind,
    /// The `keyshard` binary the lab's processes run.
    pub bin: PathBuf,
}

impl UpConfig {
    /// Checks the host count and that `bin` is an executable file; `bin` made absolute.
    pub fn new(dir: PathBuf, hosts: u8, store: StoreKind, bin: &Path) -> Result<Self> {
        if !(1..=MAX_HOSTS).contains(&hosts) {
            return Err(LabError::InvalidArgument(format!(
                "--hosts {hosts}: must be 1..={MAX_HOSTS}"
            )));
        }
        let bin = fs::canonicalize(bin).map_err(io_context(format!("--bin {}", bin.display())))?;
        let executable = fs::metadata(&bin).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        });
        if !executable {
            return Err(LabError::InvalidArgument(format!(
                "--bin {}: not an executable file",
                bin.display()
            )));
        }
        Ok(Self {
            dir,
            hosts,
            store,
            bin,
        })
    }
}

/// Host `index` (0-based)'s region and operator: eu/acme, eu/globex, us/acme, us/globex,
/// ap/acme, ap/globex, then again.
pub fn domain(index: usize) -> (&'static str, &'static str) {
    let region = REGIONS
        .get((index / OPERATORS.len()) % REGIONS.len())
        .copied()
        .unwrap_or("eu");
    let operator = OPERATORS
        .get(index % OPERATORS.len())
        .copied()
        .unwrap_or("acme");
    (region, operator)
}

/// An exclusive lock on the lab directory (flock on the directory itself), held while `up` or
/// `down` works on it; released when dropped.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] fs::File);

impl DirLock {
    /// Locks `dir`, or fails with [`LabError::Busy`] at once.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let file = fs::File::open(dir).map_err(io_context(format!("opening {}", dir.display())))?;
        // SAFETY: flock(2) on a descriptor this function owns for the call's duration.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            return Err(LabError::Busy(dir.to_owned()));
        }
        Ok(Self(file))
    }
}

/// Prepares `dir` for a new lab: creates it (0700) when missing, refuses a directory that holds a
/// running lab ([`LabError::Running`]) or anything else ([`LabError::NotEmpty`]). Returns the
/// directory made absolute and its lock.
pub fn prepare_dir(dir: &Path) -> Result<(PathBuf, DirLock)> {
    files::create_private_dir(dir)?;
    let dir = fs::canonicalize(dir).map_err(io_context(format!("resolving {}", dir.display())))?;
    let lock = DirLock::acquire(&dir)?;
    if let Ok(Some(records)) = labfile::read_starting(&dir)
        && let Some(running) = records.iter().find(|p| p.liveness() == Liveness::Ours)
    {
        return Err(LabError::Running {
            dir,
            name: running.name.clone(),
            pid: running.pid,
        });
    }
    if dir.join(LAB_FILE).symlink_metadata().is_ok() {
        if let Ok(lab) = Lab::read(&dir)
            && let Some(running) = lab
                .processes()
                .into_iter()
                .find(|p| p.liveness() == Liveness::Ours)
        {
            return Err(LabError::Running {
                dir,
                name: running.name.clone(),
                pid: running.pid,
            });
        }
        return Err(LabError::NotEmpty(dir));
    }
    let mut entries =
        fs::read_dir(&dir).map_err(io_context(format!("reading {}", dir.display())))?;
    if entries.next().is_some() {
        return Err(LabError::NotEmpty(dir));
    }
    Ok((dir, lock))
}

/// What `up` has started so far: stopped, newest first, when `up` fails, also by a panic (on
/// drop, unless [`Started::keep`] was called); and journalled in `DIR/lab.starting.json` as it
/// grows, for a `lab down` after an `up` that was killed.
#[derive(Debug)]
struct Started {
    dir: PathBuf,
    spawned: Vec<Spawned>,
    kept: bool,
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.kept {
            self.stop_all();
            let _ = fs::remove_file(self.dir.join(labfile::STARTING_FILE));
        }
    }
}

impl Started {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            spawned: Vec::new(),
            kept: false,
        }
    }

    /// The lab is up and `lab.json` written: its processes stay when this is dropped, and the
    /// journal goes.
    fn keep(&mut self) -> Result<()> {
        self.kept = true;
        let journal = self.dir.join(labfile::STARTING_FILE);
        fs::remove_file(&journal).map_err(io_context(format!("removing {}", journal.display())))
    }

    /// Adds a process and journals every process started so far.
    fn push(&mut self, spawned: Spawned) -> Result<usize> {
        self.spawned.push(spawned);
        let records: Vec<_> = self.spawned.iter().map(Spawned::current_record).collect();
        labfile::write_starting(&self.dir, &records)?;
        Ok(self.spawned.len().saturating_sub(1))
    }

    fn get(&mut self, index: usize) -> Result<&mut Spawned> {
        self.spawned
            .get_mut(index)
            .ok_or_else(|| LabError::InvalidArgument(format!("no process {index}")))
    }

    fn stop_all(&mut self) {
        for spawned in self.spawned.iter_mut().rev() {
            spawned.stop(FAILED_UP_GRACE);
        }
    }
}

/// Paths of the lab's layout under its directory.
struct Layout {
    dir: PathBuf,
    logs: PathBuf,
    ca: PathBuf,
    ek_ca: PathBuf,
    cms: PathBuf,
    client: PathBuf,
    instance: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            logs: dir.join("logs"),
            ca: dir.join("pki").join("ca.pem"),
            ek_ca: dir.join("ek-ca"),
            cms: dir.join("cms"),
            client: dir.join("client"),
            instance: dir.join("instance"),
        }
    }

    /// Creates the directories every step writes into (0700).
    fn create(&self) -> Result<()> {
        for sub in [&self.logs, &self.cms, &self.client, &self.instance] {
            files::create_private_dir(sub)?;
        }
        if let Some(parent) = self.ca.parent() {
            files::create_private_dir(parent)?;
        }
        Ok(())
    }

    fn host(&self, id: &str) -> PathBuf {
        self.dir.join("hosts").join(id)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
}

/// Brings a lab up in `config.dir` and writes `lab.json`; `progress` gets a line per step. On
/// failure, every process started so far is stopped; the directory keeps the logs. SIGINT and
/// SIGTERM while it runs are a failure too ([`LabError::Interrupted`]).
pub fn up(config: &UpConfig, progress: &mut dyn FnMut(&str)) -> Result<Lab> {
    process::watch_interrupts()?;
    let (dir, _lock) = prepare_dir(&config.dir)?;
    let mut started = Started::new(&dir);
    let lab = build(config, &dir, &mut started, progress)?;
    started.keep()?;
    Ok(lab)
}

/// A TPM the lab started: its swtpm's index in [`Started`], its TCTI and its state directory.
#[derive(Debug, Clone)]
struct LabTpm {
    index: usize,
    tcti: String,
    state: PathBuf,
}

/// A shard host the lab started, before it is ready.
#[derive(Debug)]
struct StartingHost {
    index: usize,
    id: String,
    region: &'static str,
    operator: &'static str,
    state_dir: PathBuf,
    tpm: LabTpm,
}

fn build(
    config: &UpConfig,
    dir: &Path,
    started: &mut Started,
    progress: &mut dyn FnMut(&str),
) -> Result<Lab> {
    let layout = Layout::new(dir);
    layout.create()?;
    let host_ids: Vec<String> = (1..=config.hosts).map(|i| format!("host-{i}")).collect();

    let (cms_tls, host_tls) = issue_certificates(&layout, &host_ids)?;
    progress(&format!("CA and TLS certificates: {}", layout.ca.display()));
    let (signing, client_key) = make_keys(&config.bin, &layout)?;
    progress("CMS signing key and client key pair made");
    let (host_tpms, instance_tpm, ek_bundle) = start_tpms(&layout, &host_ids, started)?;
    progress(&format!(
        "{} swtpms with EK certificates (EK CA {})",
        host_tpms.len().saturating_add(1),
        ek_bundle.display()
    ));
    let (store, etcd) = match config.store {
        StoreKind::Redb => (
            format!("redb:{}", layout.cms.join("cms.redb").display()),
            None,
        ),
        StoreKind::Etcd => {
            let (index, url) = start_etcd(&layout, started)?;
            progress(&format!("etcd on {url}"));
            (format!("etcd:{url}"), Some((index, url)))
        }
    };
    let mut command = keyshard(&config.bin);
    command
        .arg("cms")
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--store={store}"))
        .arg("--tls-cert")
        .arg(&cms_tls.cert)
        .arg("--tls-key")
        .arg(&cms_tls.key)
        .arg("--signing-key")
        .arg(&signing)
        .arg("--ek-ca")
        .arg(&ek_bundle);
    let admitted = write_admitted_hosts(&layout, &host_ids)?;
    command.arg("--hosts").arg(&admitted);
    let (cms_index, cms_url) = start_server(started, "cms", &mut command, &layout, CMS_READY)?;
    progress(&format!("CMS on {cms_url} (store {store})"));
    let cms_key = layout.cms.join("signing.pem.pub");

    let hosts = start_hosts(
        config, &layout, &cms_url, &cms_key, host_tls, host_tpms, started,
    )?;
    progress(&format!(
        "{} shard hosts starting (enrolment, registration)",
        hosts.len()
    ));
    // The instance is enrolled while the hosts start.
    let (ak_name, policy) = enrol_instance(&config.bin, &layout, &cms_url, &instance_tpm.tcti)?;
    progress(&format!(
        "instance {INSTANCE_ID} enrolled: ak name {ak_name}"
    ));
    let endpoints = wait_for_hosts(&hosts, started)?;
    progress(&format!("{} shard hosts serving", hosts.len()));

    let record =
        |started: &mut Started, index: usize| started.get(index).map(|s| s.current_record());
    let mut host_records = Vec::new();
    for (host, endpoint) in hosts.into_iter().zip(endpoints) {
        host_records.push(Host {
            process: record(started, host.index)?,
            swtpm: record(started, host.tpm.index)?,
            id: host.id,
            region: host.region.to_owned(),
            operator: host.operator.to_owned(),
            endpoint,
            tcti: host.tpm.tcti,
            state_dir: host.state_dir,
            tpm_state: host.tpm.state,
        });
    }
    let etcd = match etcd {
        Some((index, url)) => Some(Etcd {
            url,
            process: record(started, index)?,
        }),
        None => None,
    };
    let lab = Lab {
        version: labfile::LAB_FILE_VERSION,
        dir: dir.to_owned(),
        bin: config.bin.clone(),
        store,
        ca_certificate: layout.ca.clone(),
        ek_ca: ek_bundle,
        cms: Cms {
            url: cms_url,
            signing_key_public: cms_key,
            process: record(started, cms_index)?,
        },
        client: Client {
            public_key: layout.client.join("client.key.pub"),
            private_key: client_key,
        },
        etcd,
        hosts: host_records,
        instance: Instance {
            id: INSTANCE_ID.to_owned(),
            tcti: instance_tpm.tcti,
            ak_name,
            policy,
            swtpm: record(started, instance_tpm.index)?,
        },
    };
    lab.write()?;
    Ok(lab)
}

/// The lab's CA and the certificates of the CMS and of each host.
fn issue_certificates(
    layout: &Layout,
    host_ids: &[String],
) -> Result<(pki::ServerCertificate, Vec<pki::ServerCertificate>)> {
    let host_dirs: Vec<PathBuf> = host_ids.iter().map(|id| layout.host(id)).collect();
    let mut servers: Vec<(&str, &Path)> = vec![("cms", layout.cms.as_path())];
    servers.extend(
        host_ids
            .iter()
            .map(String::as_str)
            .zip(host_dirs.iter().map(PathBuf::as_path)),
    );
    let mut certificates = pki::issue(&layout.ca, &servers)?.into_iter();
    let cms = certificates
        .next()
        .ok_or_else(|| LabError::Certificate("no CMS certificate".to_owned()))?;
    Ok((cms, certificates.collect()))
}

/// The CMS's signing key and the client's key pair, made by the keyshard binary: their paths.
fn make_keys(bin: &Path, layout: &Layout) -> Result<(PathBuf, PathBuf)> {
    let signing = layout.cms.join("signing.pem");
    let log = layout.log("keygen");
    run_tool(
        "keyshard keygen",
        Command::new(bin).arg("keygen").arg("--out").arg(&signing),
        &log,
        KEYGEN_LIMIT,
    )?;
    let client_key = layout.client.join("client.key");
    run_tool(
        "keyshard credential keygen",
        Command::new(bin)
            .args(["credential", "keygen", "--out"])
            .arg(&client_key),
        &log,
        KEYGEN_LIMIT,
    )?;
    Ok((signing, client_key))
}

/// Manufactures (the first alone, so it makes the local CA) and starts a TPM per host and one
/// for the instance; the hosts' TPMs, the instance's, and the EK CA bundle.
fn start_tpms(
    layout: &Layout,
    host_ids: &[String],
    started: &mut Started,
) -> Result<(Vec<LabTpm>, LabTpm, PathBuf)> {
    let mut names: Vec<(String, PathBuf)> = host_ids
        .iter()
        .map(|id| (id.clone(), layout.host(id).join("tpm")))
        .collect();
    names.push(("instance".to_owned(), layout.instance.join("tpm")));
    let states: Vec<PathBuf> = names.iter().map(|(_, state)| state.clone()).collect();
    manufacture_all(&states, &layout.ek_ca)?;
    process::check_interrupted()?;
    let bundle = layout.ek_ca.join("bundle.pem");
    let mut pem = String::new();
    for cert in swtpm::ek_ca_certificates(&layout.ek_ca) {
        pem.push_str(
            &fs::read_to_string(&cert)
                .map_err(io_context(format!("reading {}", cert.display())))?,
        );
    }
    fs::write(&bundle, pem).map_err(io_context(format!("writing {}", bundle.display())))?;
    let mut tpms = Vec::new();
    for (name, state) in names {
        let (index, port) = start_swtpm(&name, &state, layout, started)?;
        tpms.push(LabTpm {
            index,
            tcti: swtpm::tcti(port),
            state,
        });
    }
    let instance = tpms
        .pop()
        .ok_or_else(|| LabError::InvalidArgument("no instance TPM".to_owned()))?;
    Ok((tpms, instance, bundle))
}

/// Starts a server that listens on a port of its choosing and names it on its ready line
/// (`PREFIX...ADDR ...`); its index in `started` and its `https://ADDR`.
fn start_server(
    started: &mut Started,
    name: &str,
    command: &mut Command,
    layout: &Layout,
    prefix: &str,
) -> Result<(usize, String)> {
    let index = started.push(Spawned::start(name, command, &layout.log(name))?)?;
    let ready = wait_for_lines(&mut [(started.get(index)?, prefix)], CMS_READY_LIMIT)?;
    let url = ready
        .first()
        .and_then(|line| ready_url(line))
        .ok_or_else(|| LabError::InvalidArgument(format!("{name}'s ready line has no URL")))?;
    Ok((index, url))
}

/// The `https://...` URL on a ready line.
fn ready_url(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|word| word.starts_with("https://"))
        .map(str::to_owned)
}

/// Starts every shard host (on a port each picks, named on its ready line) without waiting.
fn start_hosts(
    config: &UpConfig,
    layout: &Layout,
    cms_url: &str,
    cms_key: &Path,
    tls: Vec<pki::ServerCertificate>,
    tpms: Vec<LabTpm>,
    started: &mut Started,
) -> Result<Vec<StartingHost>> {
    let mut hosts = Vec::new();
    for (i, (tls, tpm)) in tls.into_iter().zip(tpms).enumerate() {
        let id = format!("host-{}", i.saturating_add(1));
        let (region, operator) = domain(i);
        let state_dir = layout.host(&id).join("state");
        let mut command = keyshard(&config.bin);
        command
            .arg("shard-host")
            .arg("--cms")
            .arg(cms_url)
            .arg("--ca")
            .arg(&layout.ca)
            .arg("--cms-key")
            .arg(cms_key)
            .arg("--listen=127.0.0.1:0")
            .arg("--host-id")
            .arg(&id)
            .arg("--domain")
            .arg(format!("region={region},operator={operator}"))
            .arg("--tcti")
            .arg(&tpm.tcti)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key);
        let index = started.push(Spawned::start(&id, &mut command, &layout.log(&id))?)?;
        hosts.push(StartingHost {
            index,
            id,
            region,
            operator,
            state_dir,
            tpm,
        });
    }
    Ok(hosts)
}

/// Waits until every host serves; their endpoints, from their ready lines.
fn wait_for_hosts(hosts: &[StartingHost], started: &mut Started) -> Result<Vec<String>> {
    let indices: Vec<usize> = hosts.iter().map(|h| h.index).collect();
    let mut waiting: Vec<(&mut Spawned, &str)> = started
        .spawned
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| indices.contains(i))
        .map(|(_, s)| (s, HOST_READY))
        .collect();
    let lines = wait_for_lines(&mut waiting, HOSTS_READY)?;
    lines
        .iter()
        .zip(hosts)
        .map(|(line, host)| {
            ready_url(line).ok_or_else(|| {
                LabError::InvalidArgument(format!("{}'s ready line has no URL: {line}", host.id))
            })
        })
        .collect()
}

/// Enrols the instance's TPM (`keyshard instance enroll`) and writes an instance policy naming
/// it: its AK name and the policy's path.
fn enrol_instance(
    bin: &Path,
    layout: &Layout,
    cms_url: &str,
    tcti: &str,
) -> Result<(String, PathBuf)> {
    let output = run_tool(
        "keyshard instance enroll",
        keyshard(bin)
            .args(["instance", "enroll", "--cms"])
            .arg(cms_url)
            .arg("--ca")
            .arg(&layout.ca)
            .arg("--instance-id")
            .arg(INSTANCE_ID)
            .arg("--tcti")
            .arg(tcti),
        &layout.log("instance-enroll"),
        ENROL_LIMIT,
    )?;
    let ak_name = ak_name(&output).ok_or_else(|| LabError::ToolFailed {
        tool: "keyshard instance enroll".to_owned(),
        status: "exit 0".to_owned(),
        message: "printed no `ak name HEX`".to_owned(),
    })?;
    let policy = layout.instance.join("policy.json");
    let text = serde_json::json!({"instances": [{"id": INSTANCE_ID, "ak_name": ak_name}]});
    fs::write(&policy, format!("{text}\n"))
        .map_err(io_context(format!("writing {}", policy.display())))?;
    Ok((ak_name, policy))
}

/// The CMS's `--hosts` list in the lab directory.
pub const ADMITTED_HOSTS_FILE: &str = "cms/hosts.json";

/// The `keyshard cms --hosts` list of the lab's hosts: each id in the domain [`domain`] gives it,
/// with placement weight 1 (what `keyshard shard-host` registers without `--weight`). It names
/// no `ek_sha256`: any TPM with an EK certificate of the lab's own EK CA may enrol as a listed
/// id, but only in that id's domain and weight.
pub fn admitted_hosts(host_ids: &[String]) -> serde_json::Value {
    let hosts: Vec<serde_json::Value> = host_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (region, operator) = domain(i);
            serde_json::json!({"id": id, "region": region, "operator": operator, "max_weight": 1})
        })
        .collect();
    serde_json::json!({ "hosts": hosts })
}

/// Writes [`admitted_hosts`] to [`ADMITTED_HOSTS_FILE`]; its path.
fn write_admitted_hosts(layout: &Layout, host_ids: &[String]) -> Result<PathBuf> {
    let path = layout.dir.join(ADMITTED_HOSTS_FILE);
    let text = admitted_hosts(host_ids);
    fs::write(&path, format!("{text}\n"))
        .map_err(io_context(format!("writing {}", path.display())))?;
    Ok(path)
}

/// A `keyshard` command with info logging unless the caller's RUST_LOG says otherwise.
fn keyshard(bin: &Path) -> Command {
    let mut command = Command::new(bin);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    command
}

/// The hex after "ak name " in `instance enroll`'s output.
fn ak_name(output: &str) -> Option<String> {
    let rest = output.split("ak name ").nth(1)?;
    let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (!hex.is_empty()).then_some(hex)
}

/// Manufactures every TPM: the first alone (it creates the local CA), the rest in parallel.
fn manufacture_all(states: &[PathBuf], ca: &Path) -> Result<()> {
    let Some((first, rest)) = states.split_first() else {
        return Ok(());
    };
    swtpm::manufacture(first, ca)?;
    thread::scope(|scope| {
        let handles: Vec<_> = rest
            .iter()
            .map(|state| scope.spawn(move || swtpm::manufacture(state, ca)))
            .collect();
        handles.into_iter().try_for_each(|handle| {
            handle.join().unwrap_or_else(|_| {
                Err(LabError::InvalidArgument(
                    "a swtpm_setup thread panicked".to_owned(),
                ))
            })
        })
    })
}

/// Starts swtpm on a free port pair for `name`'s TPM; its index in `started` and its port.
fn start_swtpm(
    name: &str,
    state: &Path,
    layout: &Layout,
    started: &mut Started,
) -> Result<(usize, u16)> {
    let process_name = format!("swtpm-{name}");
    let log = layout.log(&process_name);
    for attempt in 0..SWTPM_PORT_ATTEMPTS {
        let port = swtpm::free_port_pair(attempt)?;
        let before = process::read_log(&log).len();
        let mut spawned =
            Spawned::start(&process_name, &mut swtpm::socket_command(state, port), &log)?;
        let deadline = Instant::now() + SWTPM_READY;
        loop {
            if let Err(e) = process::check_interrupted() {
                spawned.stop(FAILED_UP_GRACE);
                return Err(e);
            }
            if let Some(status) = spawned.exited()? {
                let text = process::read_log(&log);
                if text
                    .get(before..)
                    .unwrap_or_default()
                    .contains("Address already in use")
                {
                    break;
                }
                return Err(spawned.exited_early(status));
            }
            let ctrl = port.saturating_add(1);
            if swtpm::listens_on(spawned.record.pid, port)
                && swtpm::listens_on(spawned.record.pid, ctrl)
            {
                return Ok((started.push(spawned)?, port));
            }
            if Instant::now() >= deadline {
                spawned.stop(FAILED_UP_GRACE);
                return Err(LabError::NotReady {
                    name: process_name,
                    seconds: SWTPM_READY.as_secs(),
                    log,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    Err(LabError::NoFreePort {
        what: "port pair for swtpm (all taken while starting)",
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|_| LabError::NoFreePort { what: "TCP port" })
}

/// Starts etcd (Debian's etcd-server) on loopback with its data in `DIR/etcd`; its index in
/// `started` and its client URL once it answers /health.
fn start_etcd(layout: &Layout, started: &mut Started) -> Result<(usize, String)> {
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = layout.dir.join("etcd");
    files::create_private_dir(&data)?;
    let mut command = Command::new("etcd");
    command
        .arg("--name=keyshard-lab")
        .arg(format!("--data-dir={}", data.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=keyshard-lab={peer_url}"))
        // A single member elects itself after one election timeout: keep it short.
        .arg("--heartbeat-interval=50")
        .arg("--election-timeout=500")
        .arg("--logger=zap")
        .arg("--log-outputs=stderr");
    let index = started.push(Spawned::start("etcd", &mut command, &layout.log("etcd"))?)?;
    let deadline = Instant::now() + ETCD_READY;
    loop {
        process::check_interrupted()?;
        let spawned = started.get(index)?;
        if let Some(status) = spawned.exited()? {
            return Err(spawned.exited_early(status));
        }
        if etcd_healthy(client) {
            return Ok((index, client_url));
        }
        if Instant::now() >= deadline {
            return Err(LabError::NotReady {
                name: "etcd".to_owned(),
                seconds: ETCD_READY.as_secs(),
                log: spawned.record.log.clone(),
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Whether etcd on 127.0.0.1:`port` answers `GET /health` with `"health":"true"` (it does once it
/// has a leader).
fn etcd_healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).contains("\"health\":\"true\"")
}

/// What to try once the lab is up: the commands, with this lab's paths.
pub fn commands(lab: &Lab) -> Vec<String> {
    let bin = lab.bin.display();
    let dir = lab.dir.display();
    let ca = lab.ca_certificate.display();
    let cms = &lab.cms.url;
    let cms_key = lab.cms.signing_key_public.display();
    let mut lines = vec![
        format!(
            "lab up: CMS {cms} (store {}), {} shard hosts, instance {} (TPM {})",
            lab.store,
            lab.hosts.len(),
            lab.instance.id,
            lab.instance.tcti
        ),
        format!("everything is in {dir}/lab.json; every process's output in {dir}/logs/"),
        format!(
            "the CMS admits only the hosts of {dir}/{ADMITTED_HOSTS_FILE} (each id in its \
             region, operator and weight 1; any TPM of the lab's EK CA may take a listed id)"
        ),
    ];
    lines.extend(lab.hosts.iter().map(|h| {
        format!(
            "  {} {}/{} at {} (pid {}, TPM {})",
            h.id, h.region, h.operator, h.endpoint, h.process.pid, h.tcti
        )
    }));
    lines.push("try:".to_owned());
    lines.push(format!("  printf 's3cret' > {dir}/secret.txt"));
    lines.push(format!(
        "  {bin} credential put --cms {cms} --ca {ca} --name demo --file {dir}/secret.txt \
         --client-pub {} --threshold 3 --shares 4 --instance-policy {}",
        lab.client.public_key.display(),
        lab.instance.policy.display()
    ));
    lines.push(format!(
        "  {bin} credential map --cms {cms} --ca {ca} --name demo --client-key {} --cms-key {cms_key}",
        lab.client.private_key.display()
    ));
    let fetch = format!(
        "  {bin} credential fetch --cms {cms} --ca {ca} --cms-key {cms_key} --name demo \
         --instance-id {} --client-key {} --tcti {}",
        lab.instance.id,
        lab.client.private_key.display(),
        lab.instance.tcti
    );
    lines.push(format!("{fetch} --out {dir}/demo.1"));
    if let Some(host) = lab.hosts.first() {
        lines.push(format!("  kill {}   # stops {}", host.process.pid, host.id));
        lines.push(format!(
            "{fetch} --out {dir}/demo.2   # k of the hosts left still release"
        ));
    }
    lines.push(format!("  {bin} lab down --dir {dir}"));
    lines.push(
        "3 of 4 spreads over 3 regions and 2 operators; 3 of 5 cannot (one operator would hold 3 \
         shares): put refuses it unless --allow-correlated"
            .to_owned(),
    );
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn six_hosts_cover_three_regions_and_two_operators_once_each() {
        let domains: Vec<_> = (0..6).map(domain).collect();
        assert_eq!(
            domains,
            [
                ("eu", "acme"),
                ("eu", "globex"),
                ("us", "acme"),
                ("us", "globex"),
                ("ap", "acme"),
                ("ap", "globex")
            ]
        );
        assert_eq!(domain(6), ("eu", "acme"));
    }

    #[test]
    fn admission_the_cms_list_names_each_lab_host_in_its_domain_at_weight_1() {
        let ids: Vec<String> = (1..=3).map(|i| format!("host-{i}")).collect();
        let list = admitted_hosts(&ids);
        assert_eq!(
            list,
            serde_json::json!({"hosts": [
                {"id": "host-1", "region": "eu", "operator": "acme", "max_weight": 1},
                {"id": "host-2", "region": "eu", "operator": "globex", "max_weight": 1},
                {"id": "host-3", "region": "us", "operator": "acme", "max_weight": 1},
            ]})
        );
    }

    #[test]
    fn the_url_is_read_from_ready_lines() {
        assert_eq!(
            ready_url("ready: cms listening on https://127.0.0.1:4433 (store redb:/x)").as_deref(),
            Some("https://127.0.0.1:4433")
        );
        assert_eq!(
            ready_url("ready: shard host host-1 serving on https://127.0.0.1:9").as_deref(),
            Some("https://127.0.0.1:9")
        );
        assert_eq!(ready_url("ready: shard host host-1 serving"), None);
    }

    #[test]
    fn the_ak_name_is_read_from_the_enrol_line() {
        let line = "instance instance-1 enrolled: ak name 000b1f2e, golden sha256:0,7\n";
        assert_eq!(ak_name(line).as_deref(), Some("000b1f2e"));
        assert_eq!(ak_name("instance enrolled\n"), None);
    }

    #[test]
    fn a_directory_with_something_in_it_is_refused_and_a_new_one_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), "x").unwrap();
        let err = prepare_dir(dir.path()).unwrap_err();
        assert!(matches!(err, LabError::NotEmpty(_)), "{err}");
        let fresh = dir.path().join("lab");
        let (path, lock) = prepare_dir(&fresh).unwrap();
        assert!(path.is_absolute());
        assert!(matches!(DirLock::acquire(&path), Err(LabError::Busy(_))));
        drop(lock);
        DirLock::acquire(&path).unwrap();
    }

    #[test]
    fn hosts_and_bin_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let sh = Path::new("/bin/sh");
        assert!(UpConfig::new(dir.path().into(), 0, StoreKind::Redb, sh).is_err());
        assert!(UpConfig::new(dir.path().into(), 33, StoreKind::Redb, sh).is_err());
        let text = dir.path().join("text");
        fs::write(&text, "x").unwrap();
        let err = UpConfig::new(dir.path().into(), 6, StoreKind::Redb, &text).unwrap_err();
        assert!(err.to_string().contains("not an executable"), "{err}");
        assert!(UpConfig::new(dir.path().into(), 6, StoreKind::Redb, sh).is_ok());
    }
}

//! A full disk, for real: the data directory on a small tmpfs. Produce requests are refused
//! with RESOURCE_EXHAUSTED before the storage engine runs out of space, reads go on, the
//! broker stays up and says why, and producing resumes once space is freed; nothing
//! acknowledged is lost. Mounting needs root (CAP_SYS_ADMIN), as the tests run here and in CI.

use std::{path::PathBuf, process::Command, time::Duration};

use tonic::Code;
use weir_client::{FetchOptions, Record, TopicConfig};
use weir_tests::{Broker, http_get};

/// A tmpfs of `size` mounted on a new temporary directory; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mounting a tmpfs failed (the disk-full test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_produce_keeps_reads_and_recovers_once_space_is_freed()
-> anyhow::Result<()> {
    let fs = Tmpfs::mount("160m")?;
    let ballast = fs.path.join("ballast");
    std::fs::write(&ballast, vec![7u8; 64 << 20])?;
    let data = fs.path.join("data");
    let mut broker = Broker::start_with(
        &data,
        &["--min-free-disk", "24MiB", "--memtable-size", "1MiB"],
    )?;
    let client = broker.client().await?;
    client.create_topic("fill", &TopicConfig::new(1)).await?;

    // Fill until refused; every acknowledged record is remembered.
    let mut acked: Vec<String> = Vec::new();
    let mut refused = None;
    for batch in 0..2000 {
        let records: Vec<Record> = (0..100)
            .map(|i| Record::value(format!("{batch}:{i}:{}", "x".repeat(1000))))
            .collect();
        let values: Vec<String> = records.iter().map(|r| r.text().into_owned()).collect();
        match client.produce("fill", Some(0), records).await {
            Ok(_) => acked.extend(values),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.ok_or_else(|| anyhow::anyhow!("the disk never filled"))?;
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(
        err.to_string()
            .contains("the disk holding the data directory is full"),
        "{err}"
    );
    assert!(
        acked.len() > 1000,
        "only {} acked before the disk filled",
        acked.len()
    );

    // Still up, ready, and saying why produce is refused; reads work.
    let ready = http_get(&broker.http_addr, "/readyz")?;
    assert!(
        ready.contains(" 200 ") && ready.contains("the disk is full"),
        "{ready}"
    );
    let first = client.fetch("fill", 0, 0, FetchOptions::default()).await?;
    assert_eq!(first.records[0].record.text(), acked[0]);

    // Space comes back: produce resumes by itself.
    std::fs::remove_file(&ballast)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match client
            .produce("fill", Some(0), vec![Record::value("after")])
            .await
        {
            Ok(_) => {
                acked.push("after".into());
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Nothing acknowledged is lost, also across a restart.
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    let mut read = Vec::new();
    let mut offset = 0;
    while read.len() < acked.len() {
        let f = client
            .fetch(
                "fill",
                0,
                offset,
                FetchOptions {
                    max_bytes: Some(8 << 20),
                    ..FetchOptions::default()
                },
            )
            .await?;
        anyhow::ensure!(!f.records.is_empty(), "records end at offset {offset}");
        offset = f.records.last().map_or(offset, |r| r.offset + 1);
        read.extend(f.records.into_iter().map(|r| r.record.text().into_owned()));
    }
    assert_eq!(read, acked);
    broker.kill();
    Ok(())
}

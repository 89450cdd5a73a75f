//! Runs `ITERATIONS` (default 1000) of one hot-path operation on 1000 records of 100 bytes,
//! for instruction counting under callgrind (`bench/callgrind`), where wall-clock timings on
//! shared cores are too noisy to compare small changes.
//!
//! `cargo run --release -p weir-broker --example codec_ops -- encode|decode [ITERATIONS]`

use bytes::Bytes;
use weir_broker::log::{Record, batch};

fn records() -> Vec<Record> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..1000)
        .map(|_| {
            let mut v = Vec::with_capacity(104);
            while v.len() < 100 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                v.extend_from_slice(&state.to_le_bytes());
            }
            v.truncate(100);
            Record {
                value: Bytes::from(v),
                ..Record::default()
            }
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let op = args.next().unwrap_or_else(|| "encode".into());
    let iterations: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let recs = records();
    let mut sealed = batch::encode(&recs, 1_700_000_000_000);
    batch::seal(&mut sealed, 0);
    let sealed = Bytes::from(sealed);
    let mut sink = 0usize;
    match op.as_str() {
        "encode" => {
            for i in 0..iterations {
                let mut b = batch::encode(&recs, 1_700_000_000_000);
                batch::seal(&mut b, i as u64);
                sink += b.len();
            }
        }
        "decode" => {
            for _ in 0..iterations {
                sink += batch::decode(&sealed)?.1.len();
            }
        }
        other => return Err(format!("unknown operation {other:?}; use encode or decode").into()),
    }
    println!("{op}: {iterations} iterations ({sink})");
    Ok(())
}

//! Durability: the real `sluice serve` is loaded from several connections and killed with
//! SIGKILL mid-load, ten times over the same data directory. Every acked event must be readable
//! afterwards at its acked position, exactly once, and appends must continue after each restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::{Sluice, wait_until};

const CYCLES: usize = 10;
const PRODUCERS: usize = 6;
const ACKS_PER_CYCLE: usize = 1000;

/// (partition, offset, value) of every acked event.
type Acked = Arc<Mutex<Vec<(u64, u64, String)>>>;

async fn producer(url: String, cycle: usize, id: usize, acked: Acked) {
    let client = reqwest::Client::new();
    for n in 0.. {
        let events: Vec<Value> = (0..1 + (n % 7))
            .map(|e| {
                json!({
                    "value": format!("c{cycle}-p{id}-n{n}-e{e}"),
                    "key": format!("k{}", (id * 31 + n + e) % 11),
                })
            })
            .collect();
        let Ok(resp) = client.post(&url).json(&events).send().await else {
            return; // the gateway is gone
        };
        if !resp.status().is_success() {
            return;
        }
        let Ok(body) = resp.json::<Value>().await else {
            return; // killed between the status line and the body: not an ack
        };
        let mut a = acked.lock().unwrap();
        for (e, r) in body["results"].as_array().unwrap().iter().enumerate() {
            a.push((
                r["partition"].as_u64().unwrap(),
                r["offset"].as_u64().unwrap(),
                serde_json::to_string(&events[e]["value"]).unwrap(),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_event_survives_repeated_sigkill_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Small segments, so segment rolls happen under load and across kills too.
    let config = "[log]\nsegment_bytes = 65536\nindex_interval_bytes = 1024\n[streams.declare.crash]\npartitions = 3\n";
    let acked: Acked = Arc::default();
    let mut next_offset_floor: HashMap<u64, u64> = HashMap::new();

    for cycle in 0..CYCLES {
        let mut s = Sluice::start(&data, config).unwrap();
        let url = s.events_url("crash");
        let before = acked.lock().unwrap().len();

        // Appends continue after a restart: new offsets come after every acked one.
        let first = reqwest::Client::new()
            .post(&url)
            .json(&json!([{"value": format!("probe-{cycle}"), "key": "k0"}]))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        let (p, o) = (
            first["results"][0]["partition"].as_u64().unwrap(),
            first["results"][0]["offset"].as_u64().unwrap(),
        );
        assert!(
            o >= *next_offset_floor.get(&p).unwrap_or(&0),
            "cycle {cycle}: offset {o} on partition {p} reuses an acked offset"
        );
        acked
            .lock()
            .unwrap()
            .push((p, o, format!("\"probe-{cycle}\"")));

        let tasks: Vec<_> = (0..PRODUCERS)
            .map(|id| tokio::spawn(producer(url.clone(), cycle, id, acked.clone())))
            .collect();
        let loaded = wait_until(Duration::from_secs(60), || {
            let n = acked.lock().unwrap().len();
            async move { n >= before + ACKS_PER_CYCLE }
        })
        .await;
        assert!(
            loaded,
            "cycle {cycle}: producers did not get {ACKS_PER_CYCLE} acks"
        );
        s.kill().unwrap(); // SIGKILL while the producers are mid-request
        for t in tasks {
            t.await.unwrap();
        }
        for (p, o, _) in acked.lock().unwrap().iter() {
            let floor = next_offset_floor.entry(*p).or_default();
            *floor = (*floor).max(o + 1);
        }
    }

    // Recovery happens on open; start once more, then read everything back.
    let s = Sluice::start(&data, config).unwrap();
    let log = s.read_log("crash").unwrap();
    let mut at: HashMap<(u64, u64), String> = HashMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_partition: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in &log {
        let (p, o) = (
            r["partition"].as_u64().unwrap(),
            r["offset"].as_u64().unwrap(),
        );
        let v = r["value"].as_str().unwrap().to_string();
        *seen.entry(v.clone()).or_default() += 1;
        at.insert((p, o), v);
        per_partition.entry(p).or_default().push(o);
    }
    for (p, offs) in &per_partition {
        let want: Vec<u64> = (0..offs.len() as u64).collect();
        assert_eq!(offs, &want, "partition {p} has gaps or duplicates");
    }
    let acked = acked.lock().unwrap();
    assert!(acked.len() >= CYCLES * ACKS_PER_CYCLE);
    for (p, o, v) in acked.iter() {
        assert_eq!(
            at.get(&(*p, *o)),
            Some(v),
            "acked event {v} missing at {p}/{o}"
        );
        assert_eq!(seen[v], 1, "acked event {v} appears {} times", seen[v]);
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "some event was written twice"
    );
    eprintln!(
        "{} acked events over {CYCLES} SIGKILL cycles, {} records in the log (the rest were in flight at a kill)",
        acked.len(),
        log.len()
    );
}

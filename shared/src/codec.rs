//! MessagePack encoding with named fields and a protocol version on every envelope.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::CodecError;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// Encodes a value as MessagePack with named fields (so fields can be added later).
pub fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes MessagePack.
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError::Malformed(e.to_string()))
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u16,
    body: &'a T,
}

#[derive(Deserialize)]
struct Version {
    v: u16,
}

#[derive(Deserialize)]
struct Envelope<T> {
    body: T,
}

/// Encodes `body` in a versioned envelope `{v, body}`.
pub fn encode_envelope<T: Serialize>(body: &T) -> Result<Vec<u8>, CodecError> {
    to_msgpack(&EnvelopeRef {
        v: PROTOCOL_VERSION,
        body,
    })
}

/// Decodes a versioned envelope; a different version is reported as such, not as garbage.
pub fn decode_envelope<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let version: Version = from_msgpack(bytes)?;
    if version.v != PROTOCOL_VERSION {
        return Err(CodecError::Version {
            got: version.v,
            expected: PROTOCOL_VERSION,
        });
    }
    Ok(from_msgpack::<Envelope<T>>(bytes)?.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Ping {
        n: u32,
        s: String,
    }

    #[test]
    fn envelope_round_trips_and_rejects_other_versions() {
        let bytes = encode_envelope(&Ping {
            n: 7,
            s: "x".into(),
        })
        .unwrap();
        assert_eq!(
            decode_envelope::<Ping>(&bytes).unwrap(),
            Ping {
                n: 7,
                s: "x".into()
            }
        );
        let other = to_msgpack(&EnvelopeRef {
            v: 99,
            body: &Ping {
                n: 1,
                s: String::new(),
            },
        })
        .unwrap();
        assert!(matches!(
            decode_envelope::<Ping>(&other),
            Err(CodecError::Version { got: 99, .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = decode_envelope::<Ping>(&bytes);
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Random bytes, and valid messages with random bytes flipped, through every decoder
    //! the processes run on input from the network: none may panic.
    use super::*;
    use crate::api::{ApiReply, ApiRequest, RunInfo};
    use crate::ids::{AttemptId, FlowRunId};
    use crate::wire::{Heartbeat, ReportAck, ReportBatch, SpawnTask};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn decode_all(bytes: &[u8]) {
        let _ = decode_envelope::<Vec<SpawnTask>>(bytes);
        let _ = decode_envelope::<Vec<(FlowRunId, AttemptId)>>(bytes);
        let _ = decode_envelope::<Heartbeat>(bytes);
        let _ = decode_envelope::<ReportBatch>(bytes);
        let _ = decode_envelope::<ReportAck>(bytes);
        let _ = decode_envelope::<ApiRequest>(bytes);
        let _ = decode_envelope::<ApiReply>(bytes);
        let _ = decode_envelope::<RunInfo>(bytes);
    }

    #[test]
    fn decoders_survive_random_and_mutated_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (rng.next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            decode_all(&bytes);
        }
        let valid = vec![
            encode_envelope(&ApiRequest::Status {
                flow_run_id: FlowRunId::new(),
            })
            .unwrap(),
            encode_envelope(&ApiRequest::Start {
                flow: "f".into(),
                params: serde_json::Map::new(),
                flow_run_id: None,
                idempotency_key: Some("k".into()),
                success_task_results: None,
                events: None,
                priority: 0,
            })
            .unwrap(),
            encode_envelope(&vec![(FlowRunId::new(), AttemptId(7))]).unwrap(),
            encode_envelope(&ReportBatch {
                agent_id: crate::ids::AgentId("a1".into()),
                incarnation: 5,
                seq: 3,
                acked: 1,
                reports: Vec::new(),
            })
            .unwrap(),
            encode_envelope(&ReportAck {
                seq: 9,
                incarnation: 1,
                runs: Some(vec![crate::ids::FlowRunId::new()]),
            })
            .unwrap(),
        ];
        for msg in &valid {
            for _ in 0..5_000 {
                let mut m = msg.clone();
                let flips = 1 + rng.next() % 4;
                for _ in 0..flips {
                    let i = (rng.next() as usize) % m.len();
                    m[i] = rng.next() as u8;
                }
                if rng.next().is_multiple_of(4) {
                    m.truncate((rng.next() as usize) % m.len());
                }
                decode_all(&m);
            }
        }
    }
}

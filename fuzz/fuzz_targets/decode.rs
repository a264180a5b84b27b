//! Fuzz target: `hmis_dataflows::events::decode` on arbitrary bytes, for every input topic.
//!
//! Input layout: byte 0 picks the topic (`% 5`, in `InputTopic::ALL` order) and, with its
//! high bit, a null value (a tombstone); byte 1 is the key length (`% 64`); then the key,
//! then the value. Bad input must come back as a `Rejection` with a reason and a detail,
//! never as a panic (contract §2, §7: a bad record is dead-lettered and processing goes on),
//! and whatever is accepted or dead-lettered must be storable (`check_any_record`). And the
//! one-pass decoder must agree with the reference one: the same event, or the same rejection
//! with the same detail (`check_decoders_agree`).
//! `dataflows/tests/decode.rs` replays the corpus (`corpus/decode/`) on stable Rust.
#![no_main]

use hmis_dataflows::events::{check_any_record, check_decoders_agree, fuzz_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((topic, key, value)) = fuzz_record(data) else { return };
    // Decoding never panics, a rejection says why, nothing accepted holds what PostgreSQL
    // refuses, and the record's dead letter fits PostgreSQL and Kafka.
    check_any_record(topic, key, value);
    // `decode` (one pass, borrowed) and `decode_reference` (the DOM) give equal results.
    check_decoders_agree(topic, key, value);
});

//! Fuzzes the broker mailbox parser, which reads what a guest writes: it must never panic, and
//! whatever it accepts must encode back to a message that parses to the same value.

#![no_main]

use keyshard_core::broker::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::parse(data) else {
        return;
    };
    let encoded = message.encode().expect("an accepted message encodes");
    assert_eq!(Message::parse(&encoded).expect("its encoding parses"), message);
    assert!(encoded.len() <= data.len(), "encoding is never longer than the padded input");
});

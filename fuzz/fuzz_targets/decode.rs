//! Every decoder on arbitrary bytes: none may panic, and whatever decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shunt_protocol::{
    CompiledPolicy, VolumeNames,
    wire::{decode_policy, decode_reply, decode_request, encode_policy, encode_reply, encode_request},
};

fuzz_target!(|data: &[u8]| {
    if let Ok((id, request)) = decode_request(data) {
        assert_eq!(encode_request(id, &request).as_deref(), Ok(data));
    }
    if let Ok(reply) = decode_reply(data) {
        assert_eq!(encode_reply(&reply).as_deref(), Ok(data));
    }
    if let Ok(rules) = decode_policy(data) {
        assert_eq!(encode_policy(&rules).as_deref(), Ok(data));
        // What the driver does next with a decoded SetPolicy: validate and compile. It must not panic either.
        let _ = CompiledPolicy::new(&rules, VolumeNames::GuidsOnly);
    }
});

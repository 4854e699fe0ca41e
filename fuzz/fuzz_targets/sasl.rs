//! The SASL messages read during login: a SASLInitialResponse body (mechanism, data length,
//! GS2 header), the GS2 flag alone, and an AuthenticationSASL body's mechanism list. No panic,
//! and a declared data length is honoured only when it matches what follows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgshift::protocol::sasl::{
    SCRAM_SHA_256_PLUS, authentication_code, gs2_channel_binding, parse_sasl_initial_response,
    without_mechanism,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse_sasl_initial_response(data) {
        let end = data
            .iter()
            .position(|&b| b == 0)
            .expect("a terminated mechanism");
        let rest = &data[end + 1..];
        let declared = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let payload = &rest[4..];
        if declared == -1 {
            assert!(payload.is_empty());
            assert!(parsed.channel_binding.is_none());
        } else {
            assert_eq!(declared as usize, payload.len());
            assert_eq!(parsed.channel_binding, gs2_channel_binding(payload));
        }
    }
    let _ = gs2_channel_binding(data);
    let _ = authentication_code(data);
    if let Some(kept) = without_mechanism(data, SCRAM_SHA_256_PLUS) {
        assert!(kept.len() < data.len());
        assert_eq!(kept[..4], data[..4]);
    }
});

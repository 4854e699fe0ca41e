//! The first packet a client sends: the length check, then the parser, then the routing
//! facts. Any input: no panic; what parses as a StartupMessage keeps its bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgshift::protocol::MAX_STARTUP_PACKET_SIZE;
use pgshift::protocol::startup::{FirstPacket, first_packet_length, parse_first_packet};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let header = [data[0], data[1], data[2], data[3]];
        match first_packet_length(header) {
            Ok(length) => assert!((8..=MAX_STARTUP_PACKET_SIZE).contains(&length)),
            Err(error) => assert_eq!(error.sqlstate(), "08P01"),
        }
    }
    let packet = Bytes::copy_from_slice(data);
    if let Ok(FirstPacket::Startup(startup)) = parse_first_packet(packet.clone()) {
        assert_eq!(startup.raw, packet);
        assert_eq!(startup.major, 3);
        let _ = startup.facts(Some(std::net::Ipv4Addr::LOCALHOST.into()));
    }
});

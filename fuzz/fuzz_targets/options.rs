//! The `options` startup parameter: splitting, settings and the tenant, on any UTF-8 text
//! (the startup parser hands over lossy UTF-8). No panic; every setting's name is free of
//! dashes; the tenant is the last `pgshift.tenant` setting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgshift::protocol::options::{TENANT_SETTING, settings, split_options, tenant};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let arguments = split_options(&text);
    assert!(arguments.len() <= text.len());
    let found = settings(&text);
    for (name, _) in &found {
        assert!(!name.contains('-'));
    }
    let expected = found
        .iter()
        .rev()
        .find(|(name, _)| name == TENANT_SETTING)
        .map(|(_, value)| value.clone());
    assert_eq!(tenant(&text), expected);
});

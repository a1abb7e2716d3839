//! registry-svc's inputs (crate `registry-model`): instance registrations (the JSON the REST
//! face reads and the coordinator stores) and the coordinator keys it parses back.
//!
//! Input: bytes read as an `Instance` JSON document and as a key. Properties checked:
//! - decoding and validating never panic;
//! - a registration that validates is a fixpoint (validating it again changes nothing), its
//!   stored JSON reads back equal, and its key parses back to its namespace, service and id;
//! - any key that parses as an instance, service or replica key is rebuilt byte for byte from
//!   the parts it parsed to.

#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_model::keys;
use registry_model::model::Instance;

fuzz_target!(|data: &[u8]| {
    if let Some((ns, svc, id)) = keys::parse_instance(data) {
        assert_eq!(keys::instance(&ns, &svc, &id).as_bytes(), data);
    }
    if let Some((ns, svc)) = keys::parse_service(data) {
        assert_eq!(keys::service(&ns, &svc).as_bytes(), data);
    }
    if let Some(id) = keys::parse_replica(data) {
        assert_eq!(keys::replica(&id).as_bytes(), data);
    }

    let Ok(instance) = serde_json::from_slice::<Instance>(data) else {
        return;
    };
    let _ = instance.reference().validate();
    let Ok(valid) = instance.normalize_for_registration() else {
        return;
    };
    let again = valid
        .clone()
        .normalize_for_registration()
        .expect("a normalized registration validates again");
    assert_eq!(again, valid, "normalizing twice changed the registration");
    let stored = serde_json::to_vec(&valid).expect("serializes");
    let read: Instance = serde_json::from_slice(&stored).expect("stored JSON reads back");
    assert_eq!(read, valid, "stored JSON does not read back equal");
    let key = keys::instance(&valid.namespace, &valid.service, &valid.instance_id);
    assert_eq!(
        keys::parse_instance(key.as_bytes()),
        Some((
            valid.namespace.clone(),
            valid.service.clone(),
            valid.instance_id.clone()
        )),
        "an instance's key does not parse back"
    );
    let _ = valid.socket_addr();
});

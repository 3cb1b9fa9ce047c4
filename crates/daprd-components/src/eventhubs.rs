//! Azure Event Hubs (`pubsub.azure.eventhubs`), in the making: so far its checkpoint store
//! ([`checkpoints`]: Blob Storage in the layout of Azure's Event Hubs SDKs). The component
//! itself (AMQP 1.0 through `fe2o3-amqp`, sharing Service Bus's connection and claims-based
//! security) is not there yet: the registry answers `pubsub.azure.eventhubs` with "not
//! supported yet".

pub mod checkpoints;

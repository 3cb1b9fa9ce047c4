//! App → broker: the publish pipeline both APIs share ([`publish`]).

pub mod publish;

//! vhd: not yet implemented (placeholder so the registry compiles).

use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::formats::{Confidence, CreateContext, OpenContext, ProbeInput};
use crate::options::CreateOptions;
use crate::storage::Storage;

pub(crate) fn probe(_input: &ProbeInput) -> Option<Confidence> {
    None
}

pub(crate) fn open(_storage: Box<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn Driver>> {
    Err(Error::unsupported("vhd images"))
}

pub(crate) fn create(
    _storage: Box<dyn Storage>,
    _ctx: &CreateContext,
    _opts: &CreateOptions,
) -> Result<Box<dyn Driver>> {
    Err(Error::unsupported("creating vhd images"))
}

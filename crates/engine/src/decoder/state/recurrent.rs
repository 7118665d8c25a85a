//! A recurrent state of fixed size per sequence (MEGA's EMA state, for example): one tensor
//! `[slots, ..dims]`, zeroed when a slot is allocated.

use candle_core::{DType, Device, Tensor};

use crate::decoder::step::StepBatch;
use crate::error::Result;

/// One layer's recurrent state for every slot.
pub struct RecurrentState {
    /// `[slots, ..dims]`.
    state: Tensor,
    /// Elements of one slot's state.
    size: usize,
}

impl RecurrentState {
    /// Allocates a zero state of shape `dims` for each of `slots` sequences.
    pub fn new(dims: &[usize], slots: usize, dtype: DType, device: &Device) -> Result<Self> {
        let mut shape = vec![slots];
        shape.extend_from_slice(dims);
        Ok(Self {
            state: Tensor::zeros(shape, dtype, device)?,
            size: dims.iter().product(),
        })
    }

    /// The state of the batch's rows, `[batch, ..dims]`, in row order.
    pub fn rows(&self, batch: &StepBatch) -> Result<Tensor> {
        Ok(self.state.index_select(batch.slot_ids(), 0)?)
    }

    /// The state of every slot, `[slots, ..dims]`.
    pub fn all(&self) -> &Tensor {
        &self.state
    }

    /// A copy of `slot`'s state, `[1, ..dims]`.
    pub(crate) fn snapshot(&self, slot: usize) -> Result<Tensor> {
        crate::decoder::state::owned_copy(&self.state.narrow(0, slot, 1)?)
    }

    /// Sets `slot`'s state to a snapshot (`[1, ..dims]`).
    pub(crate) fn restore(&self, slot: usize, saved: &Tensor) -> Result<()> {
        self.state.slice_set(saved, 0, slot)?;
        Ok(())
    }

    /// Zeroes `slot`'s state.
    pub(crate) fn reset(&self, slot: usize) -> Result<()> {
        let mut dims = self.state.dims().to_vec();
        dims[0] = 1;
        let zeros = Tensor::zeros(dims, self.state.dtype(), self.state.device())?;
        self.state.slice_set(&zeros, 0, slot)?;
        Ok(())
    }

    /// Stores each row's new state (`[batch, ..dims]`) in its slot: one scatter for the batch.
    pub(crate) fn write(&self, batch: &StepBatch, new: &Tensor) -> Result<()> {
        let slots = self.state.dim(0)?;
        let rows = batch.batch_size();
        let flat = self.state.reshape((slots, self.size))?;
        let new = new
            .to_dtype(self.state.dtype())?
            .contiguous()?
            .reshape((rows, self.size))?;
        let ids = batch
            .slot_ids()
            .reshape((rows, 1))?
            .broadcast_as((rows, self.size))?
            .contiguous()?;
        flat.scatter_set(&ids, &new, 0)?;
        Ok(())
    }
}

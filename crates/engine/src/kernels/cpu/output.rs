//! The output matrix that the CPU matmul kernels fill from several rayon tasks at once, each
//! task writing only its own rows and columns.

/// A row-major `f32` output: row `i`, column `j` is `ptr[i * stride + j]`. Copied into every
/// task; the tasks of one product write disjoint positions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedOutput {
    ptr: *mut f32,
    stride: usize,
}

// Safety: the kernels that share an output write disjoint positions of it, and the output
// outlives the parallel section that writes it.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The output `y`, with rows of `stride` values.
    pub(crate) fn new(y: &mut [f32], stride: usize) -> Self {
        Self {
            ptr: y.as_mut_ptr(),
            stride,
        }
    }

    /// The same output with row `i`, column `j` as its origin.
    ///
    /// # Safety
    /// The position must lie inside the output.
    #[inline(always)]
    pub(crate) unsafe fn at(self, i: usize, j: usize) -> Self {
        Self {
            ptr: self.ptr.add(i * self.stride + j),
            stride: self.stride,
        }
    }

    /// The origin's address, for vector stores.
    #[inline(always)]
    pub(crate) fn ptr(self) -> *mut f32 {
        self.ptr
    }

    /// Stores `value` at row `i`, column `j` from the origin.
    ///
    /// # Safety
    /// The position must lie inside the output and belong to the calling task.
    #[inline(always)]
    pub(crate) unsafe fn write(self, i: usize, j: usize, value: f32) {
        *self.ptr.add(i * self.stride + j) = value;
    }
}

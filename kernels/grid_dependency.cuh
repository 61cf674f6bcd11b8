// Programmatic dependent launch (sm_90+). kernels/loader.py launches every
// kernel of this package as a programmatic dependent of the kernel before it
// in the stream: its blocks are scheduled and start while that kernel's last
// blocks still run, which hides the launch and ramp gap between the short
// kernels of a decode step. So every kernel calls enter_dependent_grid()
// first, before it touches global memory: it waits until the kernel before
// has finished and its writes are visible (that kernel may still be reading
// memory this one writes, since torch's allocator reuses memory in stream
// order), then lets the kernel after it be scheduled. On older GPUs both
// instructions are absent and launches are ordinary.
// kernels/loader.py pastes this file in place of its #include line.

__device__ __forceinline__ void enter_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

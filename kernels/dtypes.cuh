// The 16-bit float types of the kernels, held as raw bits (u16) and widened
// to float for arithmetic: the template argument T of a kernel, T::to_float and
// T::from_float (round to nearest even). kernels/loader.py pastes this file in
// place of its #include line before NVRTC compiles a source; nvcc finds it
// beside the source.

typedef unsigned short u16;

struct Bf16 {
    static __device__ __forceinline__ float to_float(u16 bits) { return __uint_as_float(((unsigned int)bits) << 16); }
    static __device__ __forceinline__ u16 from_float(float value) {
        u16 bits;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
        return bits;
    }
};

struct Fp16 {
    static __device__ __forceinline__ float to_float(u16 bits) {
        float value;
        asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
        return value;
    }
    static __device__ __forceinline__ u16 from_float(float value) {
        u16 bits;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
        return bits;
    }
};

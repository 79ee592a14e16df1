// JNI glue of the Android app: org.pocketfusion.PfNative over apps/native's core (the export directory, CLIP BPE, the
// schedulers, torch's generator) and ExecuTorch sessions. The same file is compiled on the host for the JVM tests
// (apps/native's CMake option PF_JNI builds libpfjni.so), where it runs against the executorch wheel's libraries.
//
// Errors: bad input (a pocketfusion UserError, an unsupported scheduler option) -> IllegalArgumentException; anything
// else -> RuntimeException; both with the one-line message pf-run would print.
#include <jni.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "pipeline.h"

namespace {

struct Handle {
  pf::ExportDir dir;  // Pipeline keeps a reference: the handle owns both, in this order
  std::unique_ptr<pf::Pipeline> pipe;
  std::unique_ptr<pf::ClipTokenizer> tok;
};

std::string str(JNIEnv* env, jstring s) {
  if (s == nullptr) return "";
  const char* c = env->GetStringUTFChars(s, nullptr);
  std::string out(c ? c : "");
  if (c) env->ReleaseStringUTFChars(s, c);
  return out;
}

void throw_java(JNIEnv* env, const char* cls, const std::string& msg) {
  jclass k = env->FindClass(cls);
  if (k) env->ThrowNew(k, msg.c_str());
}

template <typename F>
auto guarded(JNIEnv* env, F&& f, decltype(f()) fallback) -> decltype(f()) {
  try {
    return f();
  } catch (const pf::UserError& e) {
    throw_java(env, "java/lang/IllegalArgumentException", e.what());
  } catch (const pf::UnsupportedConfig& e) {
    throw_java(env, "java/lang/IllegalArgumentException", e.what());
  } catch (const std::exception& e) {
    throw_java(env, "java/lang/RuntimeException", e.what());
  }
  return fallback;
}

Handle* handle(JNIEnv* env, jlong h) {
  if (h == 0) throw std::runtime_error("PfNative is closed");
  return reinterpret_cast<Handle*>(h);
}

}  // namespace

extern "C" {

JNIEXPORT jstring JNICALL Java_org_pocketfusion_PfNative_version(JNIEnv* env, jclass) {
  return env->NewStringUTF(("pf-jni " PF_VERSION " (" + pf::Session::device() + ")").c_str());
}

JNIEXPORT jlong JNICALL Java_org_pocketfusion_PfNative_open(JNIEnv* env, jclass, jstring export_dir, jstring scheduler, jint threads,
                                                            jboolean verify) {
  return guarded(env, [&]() -> jlong {
    pf::Session::set_verbose(false);  // ExecuTorch's own log lines off, as pf-run without --verbose
    pf::Session::set_threads(threads);
    auto h = std::make_unique<Handle>(Handle{pf::ExportDir::open(str(env, export_dir), verify == JNI_TRUE), nullptr, nullptr});
    h->pipe = std::make_unique<pf::Pipeline>(h->dir, str(env, scheduler));
    h->tok = std::make_unique<pf::ClipTokenizer>(h->dir.resolve(h->dir.sampler ? h->dir.sampler->tokenizer : "tokenizer"));
    return reinterpret_cast<jlong>(h.release());
  }, jlong{0});
}

JNIEXPORT void JNICALL Java_org_pocketfusion_PfNative_close(JNIEnv*, jclass, jlong h) { delete reinterpret_cast<Handle*>(h); }

JNIEXPORT jintArray JNICALL Java_org_pocketfusion_PfNative_tokenize(JNIEnv* env, jclass, jlong h, jstring prompt) {
  return guarded(env, [&]() -> jintArray {
    Handle* p = handle(env, h);
    const int n = p->dir.sampler ? p->dir.sampler->max_length : p->tok->model_max_length();
    std::vector<int32_t> ids = p->tok->encode(str(env, prompt), n);
    jintArray out = env->NewIntArray(static_cast<jsize>(ids.size()));
    env->SetIntArrayRegion(out, 0, static_cast<jsize>(ids.size()), reinterpret_cast<const jint*>(ids.data()));
    return out;
  }, static_cast<jintArray>(nullptr));
}

// [width, height, ARGB pixels...] (Android's Bitmap.setPixels layout); timings_out (length >= 5): text, U-Net, VAE and
// total ms, U-Net calls. steps 0: the export's own; noise_npy "": torch.Generator(seed)'s draws.
JNIEXPORT jintArray JNICALL Java_org_pocketfusion_PfNative_generate(JNIEnv* env, jclass, jlong h, jstring prompt, jint steps,
                                                                    jfloat guidance, jlong seed, jstring noise_npy,
                                                                    jdoubleArray timings_out) {
  return guarded(env, [&]() -> jintArray {
    Handle* p = handle(env, h);
    if (steps < 0) throw pf::UserError("steps must be >= 1 (0: the export's own)");
    pf::NoiseSource noise(static_cast<uint64_t>(seed), p->pipe->sampler().latent_shape, str(env, noise_npy));
    int w = 0, hh = 0;
    pf::Timings tm;
    std::vector<uint8_t> rgb = p->pipe->generate(str(env, prompt), steps, guidance, noise, &w, &hh, &tm);
    std::vector<jint> px(2 + static_cast<size_t>(w) * hh);
    px[0] = w;
    px[1] = hh;
    for (size_t i = 0; i < static_cast<size_t>(w) * hh; ++i)
      px[2 + i] = static_cast<jint>(0xFF000000u | (uint32_t(rgb[3 * i]) << 16) | (uint32_t(rgb[3 * i + 1]) << 8) | rgb[3 * i + 2]);
    if (timings_out != nullptr && env->GetArrayLength(timings_out) >= 5) {
      const jdouble t[5] = {tm.text_ms, tm.unet_ms, tm.vae_ms, tm.total_ms, static_cast<jdouble>(tm.unet_calls)};
      env->SetDoubleArrayRegion(timings_out, 0, 5, t);
    }
    jintArray out = env->NewIntArray(static_cast<jsize>(px.size()));
    env->SetIntArrayRegion(out, 0, static_cast<jsize>(px.size()), px.data());
    return out;
  }, static_cast<jintArray>(nullptr));
}

}  // extern "C"

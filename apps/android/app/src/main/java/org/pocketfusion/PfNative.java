package org.pocketfusion;

/**
 * The native core (apps/native: the export directory, CLIP BPE, the schedulers, ExecuTorch sessions) through JNI
 * (app/src/main/cpp/pf_jni.cpp, libpfjni.so). Plain Java so that the same class is compiled and tested on a desktop
 * JVM (tests/apps/test_android_jni.py); the Kotlin UI calls it.
 *
 * <pre>
 * try (PfNative pf = new PfNative(exportDir, null, 4)) {
 *     PfNative.Image img = pf.generate("a red circle", 0, 4.0f, 0L);   // 0 steps: the export's own
 *     bitmap.setPixels(img.argb, 0, img.width, 0, 0, img.width, img.height);
 * }
 * </pre>
 *
 * Bad input (a missing export, an unknown scheduler, a bad noise file) throws IllegalArgumentException with
 * pf-run's one-line message.
 */
public final class PfNative implements AutoCloseable {
    static {
        System.loadLibrary("pfjni");
    }

    /** One image: ARGB pixels (Bitmap.setPixels order) and the time per stage in milliseconds. */
    public static final class Image {
        public final int width, height;
        public final int[] argb;
        public final double textMs, unetMs, vaeMs, totalMs;
        public final int unetCalls;

        Image(int width, int height, int[] argb, double[] t) {
            this.width = width;
            this.height = height;
            this.argb = argb;
            this.textMs = t[0];
            this.unetMs = t[1];
            this.vaeMs = t[2];
            this.totalMs = t[3];
            this.unetCalls = (int) t[4];
        }
    }

    private long handle;

    /** Opens an ExecuTorch export directory; scheduler null: the export's own; threads 0: the runtime's default. */
    public PfNative(String exportDir, String scheduler, int threads) {
        handle = open(exportDir, scheduler == null ? "" : scheduler, threads, true);
    }

    public Image generate(String prompt, int steps, float guidance, long seed) {
        return generate(prompt, steps, guidance, seed, null);
    }

    /** noiseNpy: a .npy of the initial latents (and each stochastic step's noise), as pf-run's --noise. */
    public synchronized Image generate(String prompt, int steps, float guidance, long seed, String noiseNpy) {
        double[] t = new double[5];
        int[] px = generate(live(), prompt, steps, guidance, seed, noiseNpy == null ? "" : noiseNpy, t);
        int[] argb = new int[px.length - 2];
        System.arraycopy(px, 2, argb, 0, argb.length);
        return new Image(px[0], px[1], argb, t);
    }

    public synchronized int[] tokenize(String prompt) {
        return tokenize(live(), prompt);
    }

    @Override
    public synchronized void close() {
        if (handle != 0) {
            close(handle);
            handle = 0;
        }
    }

    private long live() {
        if (handle == 0) throw new IllegalStateException("PfNative is closed");
        return handle;
    }

    public static native String version();

    private static native long open(String exportDir, String scheduler, int threads, boolean verify);

    private static native void close(long handle);

    private static native int[] tokenize(long handle, String prompt);

    private static native int[] generate(long handle, String prompt, int steps, float guidance, long seed, String noiseNpy,
                                         double[] timingsOut);
}

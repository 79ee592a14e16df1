package org.pocketfusion.app

import android.app.Activity
import android.graphics.Bitmap
import android.os.Bundle
import android.text.InputType
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.LinearLayout
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors
import org.pocketfusion.PfNative

/**
 * Prompt in, image out, per-stage timings shown. The export directory (an ExecuTorch export:
 * `pocketfusion export MODEL --target executorch -o DIR`) is pushed to the app's files folder:
 *
 *     adb push DIR /sdcard/Android/data/org.pocketfusion.app/files/export
 *
 * Generation runs on one background thread (the native core is not re-entrant); the UI thread only shows results.
 * Never built or run (apps/README.md).
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var pf: PfNative? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val prompt = EditText(this).apply { setText("a large red circle on a blue background, center") }
        val steps = EditText(this).apply { hint = "steps (the export's own)"; inputType = InputType.TYPE_CLASS_NUMBER }
        val guidance = EditText(this).apply { setText("4"); inputType = InputType.TYPE_CLASS_NUMBER or InputType.TYPE_NUMBER_FLAG_DECIMAL }
        val seed = EditText(this).apply { setText("0"); inputType = InputType.TYPE_CLASS_NUMBER }
        val button = Button(this).apply { text = "Generate" }
        val image = ImageView(this).apply { adjustViewBounds = true; minimumHeight = 512 }
        val status = TextView(this).apply { text = PfNative.version() }
        val root = LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            setPadding(32, 32, 32, 32)
            listOf(prompt, steps, guidance, seed, button, image, status).forEach { addView(it, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT)) }
        }
        setContentView(root)

        val exportDir = File(getExternalFilesDir(null), "export")
        button.setOnClickListener {
            button.isEnabled = false
            status.text = "generating…"
            val args = Triple(prompt.text.toString(), steps.text.toString().toIntOrNull() ?: 0, guidance.text.toString().toFloatOrNull() ?: 4f)
            val s = seed.text.toString().toLongOrNull() ?: 0L
            worker.execute {
                val result = runCatching {
                    val p = pf ?: PfNative(exportDir.path, null, 4).also { pf = it }
                    p.generate(args.first, args.second, args.third, s)
                }
                runOnUiThread {
                    button.isEnabled = true
                    result.onSuccess { img ->
                        val bmp = Bitmap.createBitmap(img.width, img.height, Bitmap.Config.ARGB_8888)
                        bmp.setPixels(img.argb, 0, img.width, 0, 0, img.width, img.height)
                        image.setImageBitmap(Bitmap.createScaledBitmap(bmp, img.width * 4, img.height * 4, false))
                        status.text = "text encoder %.1f ms\nU-Net %.1f ms (%d calls, %.1f ms each)\nVAE decoder %.1f ms\ntotal %.0f ms".format(
                            img.textMs, img.unetMs, img.unetCalls, img.unetMs / maxOf(1, img.unetCalls), img.vaeMs, img.totalMs)
                    }.onFailure { e -> status.text = "error: ${e.message}" }
                }
            }
        }
    }

    override fun onDestroy() {
        worker.execute { pf?.close(); pf = null }
        worker.shutdown()
        super.onDestroy()
    }
}

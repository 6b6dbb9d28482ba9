package org.edgesparse.bench

import android.app.Activity
import android.os.Bundle
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.LinearLayout
import android.widget.Spinner
import android.widget.TextView
import org.json.JSONObject
import java.io.File

/** Pick a .pte from the app's files folder (adb push it there), run it, read latency and memory. */
class MainActivity : Activity() {
    private lateinit var picker: Spinner
    private lateinit var readout: TextView
    private lateinit var models: List<File>

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val folder = getExternalFilesDir(null) ?: filesDir
        models = folder.listFiles { file -> file.name.endsWith(".pte") }?.sortedBy { it.name } ?: emptyList()
        picker = Spinner(this).apply {
            adapter = ArrayAdapter(this@MainActivity, android.R.layout.simple_spinner_dropdown_item, models.map { it.name })
        }
        readout = TextView(this).apply {
            textSize = 16f
            text = if (models.isEmpty()) "No .pte found: adb push model.pte $folder/" else "Pick a model, then Run."
        }
        val run = Button(this).apply {
            text = "Run"
            setOnClickListener { runSelected() }
        }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            setPadding(48, 48, 48, 48)
            addView(picker)
            addView(run)
            addView(readout)
        })
    }

    private fun runSelected() {
        val model = models.getOrNull(picker.selectedItemPosition) ?: return
        readout.text = "Running ${model.name}..."
        Thread {
            val json = File(cacheDir, "result.json")
            val rc = NativeBench.run(arrayOf(model.path, "--runs", "200", "--warmup", "20", "--min-seconds", "2"), json.path)
            val text = if (rc == -1) "Cannot write $json" else summary(JSONObject(json.readText()))
            runOnUiThread { readout.text = text }
        }.start()
    }

    private fun summary(result: JSONObject): String {
        if (result.has("error")) return "Error: ${result.getString("error")}"
        val times = result.getJSONArray("times_ms").let { array -> List(array.length()) { array.getDouble(it) }.sorted() }
        fun pct(q: Double) = times[minOf(times.size - 1, (q * times.size).toInt())]
        return "%d runs\np50 %.3f ms   p90 %.3f ms   min %.3f ms\nload %.1f ms   first run %.2f ms\npeak RSS %.1f MB (the whole app)".format(
            times.size, pct(0.5), pct(0.9), times.first(), result.getDouble("load_ms"), result.getDouble("first_run_ms"),
            result.getDouble("peak_rss_mb"))
    }
}

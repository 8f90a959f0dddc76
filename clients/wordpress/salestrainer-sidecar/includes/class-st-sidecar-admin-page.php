<?php
/**
 * Tools → Transcription jobs: the recent jobs with their state, durations and error, so an operator
 * can see a transcript arrive (or why it did not) without SQL.
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

/**
 * The admin page.
 */
final class ST_Sidecar_Admin_Page {

	const SLUG = 'salestrainer-jobs';
	const ROWS = 50;

	/**
	 * Add the page under Tools (admin_menu).
	 */
	public static function register() {
		add_management_page(
			__( 'Transcription jobs', 'salestrainer-sidecar' ),
			__( 'Transcription jobs', 'salestrainer-sidecar' ),
			'manage_options',
			self::SLUG,
			array( self::class, 'render' )
		);
	}

	/**
	 * Print the page.
	 */
	public static function render() {
		if ( ! current_user_can( 'manage_options' ) ) {
			return;
		}
		$jobs    = ST_Sidecar_Job_Store::recent( self::ROWS );
		$missing = ST_Sidecar_Config::missing_for_publishing();
		if ( null === ST_Sidecar_Config::get( 'server_token' ) ) {
			$missing[] = 'WP_SERVER_TOKEN';
		}
		echo '<div class="wrap"><h1>' . esc_html__( 'Transcription jobs', 'salestrainer-sidecar' ) . '</h1>';
		if ( $missing ) {
			echo '<div class="notice notice-warning"><p>' . esc_html(
				sprintf(
					/* translators: %s: constant names */
					__( 'Not configured: define %s in wp-config.php.', 'salestrainer-sidecar' ),
					implode( ', ', $missing )
				)
			) . '</p></div>';
		}
		echo '<p>' . esc_html(
			sprintf(
				/* translators: %d: number of rows */
				__( 'The %d most recently changed jobs, newest first. Times are UTC.', 'salestrainer-sidecar' ),
				self::ROWS
			)
		) . '</p>';
		echo '<table class="widefat striped" id="salestrainer-jobs"><thead><tr>';
		$headings = array(
			__( 'Job', 'salestrainer-sidecar' ),
			__( 'State', 'salestrainer-sidecar' ),
			__( 'Recording', 'salestrainer-sidecar' ),
			__( 'Audio', 'salestrainer-sidecar' ),
			__( 'Processing', 'salestrainer-sidecar' ),
			__( 'Transcript / error', 'salestrainer-sidecar' ),
			__( 'Updated', 'salestrainer-sidecar' ),
		);
		foreach ( $headings as $heading ) {
			echo '<th scope="col">' . esc_html( $heading ) . '</th>';
		}
		echo '</tr></thead><tbody>';
		if ( ! $jobs ) {
			echo '<tr><td colspan="7">' . esc_html__( 'No jobs yet.', 'salestrainer-sidecar' ) . '</td></tr>';
		}
		foreach ( $jobs as $job ) {
			self::row( $job );
		}
		echo '</tbody></table></div>';
	}

	/**
	 * One job's row.
	 *
	 * @param array $job A row of the job table.
	 */
	private static function row( array $job ) {
		printf( '<tr data-job-id="%1$s" data-status="%2$s">', esc_attr( $job['job_id'] ), esc_attr( $job['status'] ) );
		echo '<td><code>' . esc_html( $job['job_id'] ) . '</code></td>';
		echo '<td class="status">' . esc_html( $job['status'] ) . '</td>';
		echo '<td><code>' . esc_html( $job['s3_key'] ) . '</code></td>';
		echo '<td>' . esc_html( null === $job['duration_seconds'] ? '–' : number_format_i18n( $job['duration_seconds'], 1 ) . ' s' ) . '</td>';
		echo '<td>' . esc_html( null === $job['total_ms'] ? '–' : number_format_i18n( $job['total_ms'] / 1000, 1 ) . ' s' ) . '</td>';
		if ( ST_Sidecar_Job_Store::FAILED === $job['status'] ) {
			echo '<td class="error"><strong>' . esc_html( (string) $job['error_code'] ) . '</strong> ' . esc_html( (string) $job['error_message'] ) . '</td>';
		} else {
			$text = isset( $job['transcript']['text'] ) ? (string) $job['transcript']['text'] : '';
			echo '<td class="transcript">' . esc_html( wp_trim_words( $text, 30 ) ) . '</td>';
		}
		echo '<td>' . esc_html( $job['updated_at'] ) . '</td></tr>';
	}
}

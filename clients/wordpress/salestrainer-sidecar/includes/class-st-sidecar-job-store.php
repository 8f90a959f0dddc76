<?php
/**
 * The job table: one row per job_id, the only place a job's state is kept on this site.
 *
 * States and transitions:
 *
 *     enqueue --> queued --callback completed--> completed   (final: later callbacks change nothing)
 *                   |  \--callback failed-----> failed --callback completed--> completed
 *                   |                             |        (a job redriven from the DLQ that then succeeds)
 *                   +--SQS refused the send-----> failed (error_code enqueue_failed)
 *                                                 +--enqueue again--> queued
 *
 * A callback for a job this site never enqueued (the CLI's `sidecar enqueue`, the old /transcribe
 * intake) creates its row in the callback's state. Every transition is one conditional write, so two
 * deliveries of the same callback racing each other store it once: the loser changes no row and is
 * told it was a duplicate. MySQL reports rows *changed*, and each transition changes `status`, so a
 * row count of 1 means this request made the transition.
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

// This class is the job table's storage layer: every query is a direct one by design, and none is
// cached, because a cached row would hide a callback that has just arrived.
// phpcs:disable WordPress.DB.DirectDatabaseQuery, WordPress.VIP.DirectDatabaseQuery

/**
 * Reads and writes the job table through $wpdb.
 */
final class ST_Sidecar_Job_Store {

	const SCHEMA_VERSION = '1';
	const VERSION_OPTION = 'salestrainer_sidecar_db_version';

	const QUEUED    = 'queued';
	const COMPLETED = 'completed';
	const FAILED    = 'failed';

	const STORED    = 'stored';
	const DUPLICATE = 'duplicate';

	/**
	 * The table's name, with this site's prefix.
	 *
	 * @return string
	 */
	public static function table() {
		global $wpdb;
		return $wpdb->prefix . 'salestrainer_jobs';
	}

	/**
	 * Create or upgrade the table (activation, and after an update of the plugin's files).
	 */
	public static function install() {
		global $wpdb;
		require_once ABSPATH . 'wp-admin/includes/upgrade.php';
		$table   = self::table();
		$charset = $wpdb->get_charset_collate();
		// job_id is ASCII by contract and case-sensitive (it names an S3 object), so it gets a binary
		// collation: the site's default utf8mb4_unicode_ci would make Job-1 and job-1 one row.
		dbDelta(
			"CREATE TABLE {$table} (
			id bigint(20) unsigned NOT NULL AUTO_INCREMENT,
			job_id varchar(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
			status varchar(16) NOT NULL,
			s3_key varchar(1024) NOT NULL DEFAULT '',
			message_id varchar(128) DEFAULT NULL,
			metadata longtext DEFAULT NULL,
			transcript longtext DEFAULT NULL,
			model varchar(128) DEFAULT NULL,
			language varchar(32) DEFAULT NULL,
			duration_seconds double DEFAULT NULL,
			total_ms bigint(20) unsigned DEFAULT NULL,
			attempt int(10) unsigned DEFAULT NULL,
			error_code varchar(64) DEFAULT NULL,
			error_message text DEFAULT NULL,
			created_at datetime NOT NULL,
			updated_at datetime NOT NULL,
			PRIMARY KEY  (id),
			UNIQUE KEY job_id (job_id),
			KEY updated_at (updated_at)
			) {$charset};"
		);
		update_option( self::VERSION_OPTION, self::SCHEMA_VERSION );
	}

	/**
	 * Install the table when the stored schema version is not this code's.
	 */
	public static function maybe_upgrade() {
		if ( get_option( self::VERSION_OPTION ) !== self::SCHEMA_VERSION ) {
			self::install();
		}
	}

	/**
	 * A job's row, with metadata and transcript decoded; null when there is none.
	 *
	 * @param string $job_id The job's id.
	 * @return array|null
	 */
	public static function get( $job_id ) {
		global $wpdb;
		$row = $wpdb->get_row( $wpdb->prepare( "SELECT * FROM {$wpdb->prefix}salestrainer_jobs WHERE job_id = %s", $job_id ), ARRAY_A );
		return $row ? self::decode( $row ) : null;
	}

	/**
	 * The most recently changed jobs, newest first.
	 *
	 * @param int $limit How many.
	 * @return array[]
	 */
	public static function recent( $limit = 50 ) {
		global $wpdb;
		$rows = $wpdb->get_results( $wpdb->prepare( "SELECT * FROM {$wpdb->prefix}salestrainer_jobs ORDER BY updated_at DESC, id DESC LIMIT %d", $limit ), ARRAY_A );
		return array_map( array( self::class, 'decode' ), $rows ? $rows : array() );
	}

	/**
	 * Record a job as queued before it is sent; refused for a completed job.
	 *
	 * @param string     $job_id   The job's id.
	 * @param string     $s3_key   The recording.
	 * @param array|null $metadata What the callback will echo.
	 * @return true|WP_Error
	 */
	public static function begin( $job_id, $s3_key, $metadata ) {
		$fields  = array(
			'status'        => self::QUEUED,
			's3_key'        => $s3_key,
			'metadata'      => null === $metadata ? null : wp_json_encode( $metadata ),
			'message_id'    => null,
			'error_code'    => null,
			'error_message' => null,
		);
		$changed = self::transition( $job_id, $fields, array( self::COMPLETED ) );
		if ( is_wp_error( $changed ) ) {
			return $changed;
		}
		$row = self::get( $job_id );
		if ( ! $changed && $row && self::COMPLETED === $row['status'] ) {
			return new WP_Error( 'salestrainer_job_completed', sprintf( 'job %s is already completed; use a new job_id to transcribe again', $job_id ) );
		}
		return true;
	}

	/**
	 * Note the MessageId SQS gave a queued job.
	 *
	 * @param string $job_id     The job's id.
	 * @param string $message_id SQS MessageId.
	 */
	public static function sent( $job_id, $message_id ) {
		self::update_where( $job_id, array( 'message_id' => $message_id ), self::QUEUED );
	}

	/**
	 * A queued job whose send SQS refused: failed, with the reason.
	 *
	 * @param string $job_id  The job's id.
	 * @param string $message Why.
	 */
	public static function not_sent( $job_id, $message ) {
		$fields = array(
			'status'        => self::FAILED,
			'error_code'    => 'enqueue_failed',
			'error_message' => $message,
		);
		self::update_where( $job_id, $fields, self::QUEUED );
	}

	/**
	 * Store a completed callback unless the job is already completed.
	 *
	 * @param string $job_id The job's id.
	 * @param array  $fields Columns from the callback.
	 * @return string|WP_Error STORED or DUPLICATE.
	 */
	public static function complete( $job_id, array $fields ) {
		$fields  = array(
			'status'        => self::COMPLETED,
			'error_code'    => null,
			'error_message' => null,
		) + $fields;
		$changed = self::transition( $job_id, $fields, array( self::COMPLETED ) );
		return is_wp_error( $changed ) ? $changed : ( $changed ? self::STORED : self::DUPLICATE );
	}

	/**
	 * Store a failed callback unless the job already has a final state.
	 *
	 * @param string $job_id The job's id.
	 * @param array  $fields Columns from the callback.
	 * @return string|WP_Error STORED or DUPLICATE.
	 */
	public static function fail( $job_id, array $fields ) {
		$fields  = array( 'status' => self::FAILED ) + $fields;
		$changed = self::transition( $job_id, $fields, array( self::COMPLETED, self::FAILED ) );
		return is_wp_error( $changed ) ? $changed : ( $changed ? self::STORED : self::DUPLICATE );
	}

	/**
	 * Write $fields to the job's row unless its status is one of $unless; create the row if it has none.
	 *
	 * @param string   $job_id The job's id.
	 * @param array    $fields Column => value (null writes NULL).
	 * @param string[] $unless Statuses that must not change.
	 * @return bool|WP_Error Whether this call changed or created the row.
	 */
	private static function transition( $job_id, array $fields, array $unless ) {
		global $wpdb;
		$now   = current_time( 'mysql', true );
		$set   = self::assignments( $fields + array( 'updated_at' => $now ) );
		$guard = implode( ', ', array_map( array( self::class, 'quote' ), $unless ) );
		// $set and $guard are made of prepare()d pieces; $wpdb->update() cannot say "unless status is".
		// phpcs:ignore WordPress.DB.PreparedSQL, WordPress.WP.PreparedSQL
		$updated = $wpdb->query( $wpdb->prepare( "UPDATE {$wpdb->prefix}salestrainer_jobs SET {$set} WHERE job_id = %s AND status NOT IN ({$guard})", $job_id ) );
		if ( false === $updated ) {
			return new WP_Error( 'salestrainer_db_error', 'could not update the job table: ' . $wpdb->last_error, array( 'status' => 500 ) );
		}
		if ( $updated > 0 ) {
			return true;
		}
		// No row to change: create it, unless one appeared meanwhile (then `id = id` changes nothing and
		// MySQL reports 0 rows).
		$values = self::assignments(
			$fields + array(
				'job_id'     => $job_id,
				'created_at' => $now,
				'updated_at' => $now,
			)
		);
		// $values is made of prepare()d pieces; $wpdb->insert() cannot say "unless the row exists".
		// phpcs:ignore WordPress.DB.PreparedSQL, WordPress.WP.PreparedSQL
		$inserted = $wpdb->query( "INSERT INTO {$wpdb->prefix}salestrainer_jobs SET {$values} ON DUPLICATE KEY UPDATE id = id" );
		if ( false === $inserted ) {
			return new WP_Error( 'salestrainer_db_error', 'could not insert into the job table: ' . $wpdb->last_error, array( 'status' => 500 ) );
		}
		return $inserted > 0;
	}

	/**
	 * Write $fields to the job's row if its status is $status.
	 *
	 * @param string $job_id The job's id.
	 * @param array  $fields Column => value.
	 * @param string $status Required current status.
	 */
	private static function update_where( $job_id, array $fields, $status ) {
		global $wpdb;
		$set = self::assignments( $fields + array( 'updated_at' => current_time( 'mysql', true ) ) );
		// phpcs:ignore WordPress.DB.PreparedSQL, WordPress.WP.PreparedSQL -- $set is made of prepare()d pieces.
		$wpdb->query( $wpdb->prepare( "UPDATE {$wpdb->prefix}salestrainer_jobs SET {$set} WHERE job_id = %s AND status = %s", $job_id, $status ) );
	}

	/**
	 * "`col` = value, ..." with every value escaped by $wpdb->prepare (null becomes NULL).
	 *
	 * @param array $fields Column => value; columns are this class's own names, never input.
	 * @return string
	 */
	private static function assignments( array $fields ) {
		global $wpdb;
		$parts = array();
		foreach ( $fields as $column => $value ) {
			if ( null === $value ) {
				$parts[] = "`{$column}` = NULL";
			} elseif ( is_int( $value ) ) {
				$parts[] = $wpdb->prepare( "`{$column}` = %d", $value ); // phpcs:ignore WordPress.DB.PreparedSQL, WordPress.WP.PreparedSQL -- a column name of this class.
			} else {
				$parts[] = $wpdb->prepare( "`{$column}` = %s", (string) $value ); // phpcs:ignore WordPress.DB.PreparedSQL, WordPress.WP.PreparedSQL -- a column name of this class.
			}
		}
		return implode( ', ', $parts );
	}

	/**
	 * One escaped string literal.
	 *
	 * @param string $value The value.
	 * @return string
	 */
	private static function quote( $value ) {
		global $wpdb;
		return $wpdb->prepare( '%s', $value );
	}

	/**
	 * A row with its JSON columns decoded and its numbers typed.
	 *
	 * @param array $row As read.
	 * @return array
	 */
	private static function decode( array $row ) {
		foreach ( array( 'metadata', 'transcript' ) as $column ) {
			$row[ $column ] = null === $row[ $column ] ? null : json_decode( $row[ $column ], true );
		}
		foreach ( array( 'duration_seconds' ) as $column ) {
			$row[ $column ] = null === $row[ $column ] ? null : (float) $row[ $column ];
		}
		foreach ( array( 'id', 'total_ms', 'attempt' ) as $column ) {
			$row[ $column ] = null === $row[ $column ] ? null : (int) $row[ $column ];
		}
		return $row;
	}
}
